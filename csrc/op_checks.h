// Argument checks shared by the CPU (csrc/cpu/ops_cpu.cpp) and CUDA (csrc/cuda/ops_cuda.cpp) registrations, so
// both devices reject the same inputs with the same messages; the CuPy path runs check_index_range through the op
// peft_sparse::_check_indices (csrc/ops.cpp). TORCH_CHECK_VALUE / TORCH_CHECK_TYPE surface in Python as
// ValueError / TypeError naming the op and the offending argument.
#pragma once

#include <torch/types.h>

#include <string>

#include <optional>
#include <vector>

namespace peft_sparse_checks {

inline void check_indices(const at::Tensor& indices, const at::Tensor& like, const char* op) {
  TORCH_CHECK_VALUE(indices.dim() == 1, op, ": indices must be 1-D, got shape ", indices.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, op,
                   ": indices must be int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.device() == like.device(), op, ": indices are on ", indices.device(), ", expected ",
                    like.device());
}

// The index contract of every backend: flat positions lie in [0, numel) and, for ops that need it (`sorted`),
// ascend. The kernels index memory with them unchecked, so this runs before any kernel, as one reduction over the
// k indices. On the CPU the result is read at once and a bad set raises ValueError naming the range it spans. On
// CUDA, reading it would make the host wait for the stream on every call (every forward and backward of every
// layer), so the check is queued instead (at::_assert_async, as torch's own indexing ops check on the device): a
// bad set stops the stream with a device-side assert naming the op, and nothing is written out of bounds.
inline void check_index_range(const at::Tensor& indices, int64_t numel, bool sorted, const char* op) {
  const int64_t k = indices.numel();
  if (k == 0) return;
  const auto [low, high] = at::aminmax(indices);
  at::Tensor ascending;
  if (sorted && k > 1) {
    ascending = (indices.narrow(0, 1, k - 1) >= indices.narrow(0, 0, k - 1)).all();
  }
  if (indices.is_cuda()) {
    at::Tensor valid = at::logical_and(low >= 0, high < numel);
    if (ascending.defined()) valid = at::logical_and(valid, ascending);
    at::_assert_async(valid, std::string(op) + ": indices out of range [0, " + std::to_string(numel) + ")" +
                                 (sorted ? " or not sorted ascending" : ""));
    return;
  }
  const int64_t first = low.item<int64_t>(), last = high.item<int64_t>();
  TORCH_CHECK_VALUE(first >= 0 && last < numel, op, ": indices out of range [0, ", numel, "): they span [", first,
                    ", ", last, "]");
  TORCH_CHECK_VALUE(!ascending.defined() || ascending.item<bool>(), op, ": indices must be sorted ascending");
}

inline void check_values(const at::Tensor& values, const at::Tensor& indices, const char* op) {
  TORCH_CHECK_VALUE(values.dim() == 1 && values.size(0) == indices.size(0), op,
                    ": values must be 1-D with one value per index, got shapes ", values.sizes(), " and ",
                    indices.sizes());
}

inline void check_scatter_add(const at::Tensor& dense, const at::Tensor& indices, const at::Tensor& values) {
  TORCH_CHECK_VALUE(dense.dim() == 2, "scatter_add_: dense must be 2-D, got shape ", dense.sizes());
  check_indices(indices, dense, "scatter_add_");
  check_values(values, indices, "scatter_add_");
  check_index_range(indices, dense.size(0) * dense.size(1), false, "scatter_add_");
}

inline void check_sddmm_gather(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices,
                               int64_t in_features) {
  TORCH_CHECK_VALUE(grad_output.dim() == 2 && input.dim() == 2 && grad_output.size(0) == input.size(0),
                    "sddmm_gather: expected grad_output (N, out) and input (N, in), got ", grad_output.sizes(),
                    " and ", input.sizes());
  TORCH_CHECK_VALUE(input.size(1) == in_features, "sddmm_gather: input has ", input.size(1),
                    " features, expected in_features=", in_features);
  TORCH_CHECK_TYPE(grad_output.scalar_type() == input.scalar_type(), "sddmm_gather: grad_output is ",
                   grad_output.scalar_type(), " but input is ", input.scalar_type());
  check_indices(indices, input, "sddmm_gather");
  check_index_range(indices, grad_output.size(1) * in_features, false, "sddmm_gather");
}

// What dequant_scatter's kernels need once its arguments are known to be consistent.
struct DequantLayout {
  std::vector<int64_t> sizes;
  int64_t numel;
  bool nested;
};

inline DequantLayout check_dequant_scatter(const at::Tensor& packed, const at::Tensor& absmax,
                                           const at::Tensor& code, int64_t blocksize, c10::SymIntArrayRef shape,
                                           at::ScalarType out_dtype, const at::Tensor& indices,
                                           const at::Tensor& values, const std::optional<at::Tensor>& nested_absmax,
                                           const std::optional<at::Tensor>& nested_code, int64_t nested_blocksize) {
  DequantLayout layout{{}, 1, nested_absmax.has_value()};
  for (const auto& size : shape) {
    layout.sizes.push_back(size.expect_int());
    layout.numel *= layout.sizes.back();
  }
  TORCH_CHECK_VALUE(blocksize > 0, "dequant_scatter: blocksize must be positive, got ", blocksize);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "dequant_scatter: packed must be uint8, got ",
                   packed.scalar_type());
  TORCH_CHECK_VALUE(packed.numel() * 2 >= layout.numel, "dequant_scatter: packed holds ", packed.numel() * 2,
                    " 4-bit values, shape ", layout.sizes, " needs ", layout.numel);
  TORCH_CHECK_VALUE(code.numel() == 16 && code.scalar_type() == at::kFloat,
                    "dequant_scatter: code must be 16 float32 values, got ", code.numel(), " ", code.scalar_type());
  TORCH_CHECK_TYPE(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
                   "dequant_scatter: out_dtype must be float32, float16 or bfloat16, got ", out_dtype);
  check_indices(indices, packed, "dequant_scatter");
  check_values(values, indices, "dequant_scatter");
  TORCH_CHECK_VALUE(layout.nested == nested_code.has_value(),
                    "dequant_scatter: nested_absmax and nested_code must be given together");
  const int64_t num_blocks = (layout.numel + blocksize - 1) / blocksize;
  TORCH_CHECK_VALUE(absmax.numel() >= num_blocks, "dequant_scatter: absmax has ", absmax.numel(),
                    " entries, expected ", num_blocks);
  TORCH_CHECK_TYPE(absmax.scalar_type() == (layout.nested ? at::kByte : at::kFloat),
                   "dequant_scatter: absmax must be ", layout.nested ? "uint8 (double quantisation)" : "float32",
                   ", got ", absmax.scalar_type());
  if (layout.nested) {
    TORCH_CHECK_VALUE(nested_blocksize > 0, "dequant_scatter: nested_blocksize must be positive, got ",
                      nested_blocksize);
    TORCH_CHECK_VALUE(nested_code->numel() == 256, "dequant_scatter: nested_code must have 256 entries, got ",
                      nested_code->numel());
    TORCH_CHECK_VALUE(nested_absmax->numel() >= (num_blocks + nested_blocksize - 1) / nested_blocksize,
                      "dequant_scatter: nested_absmax has ", nested_absmax->numel(), " entries, expected ",
                      (num_blocks + nested_blocksize - 1) / nested_blocksize);
  }
  // Sorted: the CPU kernel binary-searches the indices, the CUDA kernel finds each position's run of deltas among
  // its neighbours.
  check_index_range(indices, layout.numel, true, "dequant_scatter");
  return layout;
}

}  // namespace peft_sparse_checks
