// The launch plan of the CUDA sddmm_gather kernel (csrc/cuda/kernels.cu): into how many token ranges ("splits")
// each entry's dot product is cut. This is its only definition. The CUDA extension's binding
// (csrc/cuda/ops_cuda.cpp) calls it directly; the CuPy path (peft_sparse/ops/_cupy.py), which compiles only the
// device code with NVRTC, gets it through the op peft_sparse::_sddmm_plan that csrc/ops.cpp registers in the part
// of the extension every build has. The plan fixes the order of the sums, so both paths give identical results.
//
// Plain C++ (no torch or CUDA header), so that the CPU-only build and nvcc's compile of kernels.cu both include it.
#pragma once

#include <algorithm>
#include <cstdint>

namespace peft_sparse_plan {

struct SddmmPlan {
  int64_t splits;            // token ranges, reduced in a fixed order afterwards (deterministic sums)
  int64_t tokens_per_split;  // a multiple of 8 (16-byte aligned token ranges for 16-bit types)
};

// Token ranges small enough that a range of `input` (in_features x tokens) stays in L2 while every entry's warp
// reads its column, and numerous enough to give the GPU ~64 warps per SM when k is small. `element_size` is the
// byte size of one input element, `num_sms` the device's multiprocessor count.
inline SddmmPlan sddmm_plan(int64_t num_tokens, int64_t in_features, int64_t num_entries, int64_t element_size,
                            int64_t num_sms) {
  const auto ceil_div = [](int64_t a, int64_t b) { return (a + b - 1) / b; };
  const int64_t tokens = std::max<int64_t>(num_tokens, 1);
  const int64_t column_bytes = std::max<int64_t>(in_features, 1) * element_size;
  const int64_t chunk = std::max<int64_t>(256, (int64_t{16} << 20) / column_bytes / 256 * 256);
  int64_t splits = ceil_div(tokens, chunk);
  const int64_t wanted = ceil_div(num_sms * 64, std::max<int64_t>(num_entries, 1));
  if (wanted > splits) splits = std::min(wanted, ceil_div(tokens, 64));
  splits = std::max<int64_t>(1, std::min<int64_t>(splits, 128));
  const int64_t tokens_per_split = ceil_div(ceil_div(tokens, splits), 8) * 8;
  return {ceil_div(tokens, tokens_per_split), tokens_per_split};
}

}  // namespace peft_sparse_plan
