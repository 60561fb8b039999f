// Launchers of the peft-sparse CUDA kernels (csrc/cuda/kernels.cu).
//
// This header, like kernels.cu, includes no PyTorch header: raw device pointers, sizes and a cudaStream_t in,
// a cudaError_t out. The torch binding (csrc/cuda/ops_cuda.cpp) checks tensors, allocates outputs and workspaces
// and calls these; the same kernels are compiled at run time by CuPy/NVRTC (peft_sparse/ops/_cupy.py).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "../sddmm_plan.h"

namespace peft_sparse_cuda {

// Storage dtypes understood by the kernels. Half and bfloat16 are passed as raw 16-bit words.
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// dense[row * stride_row + col * stride_col] += values[i] at row = indices[i] / cols, col = indices[i] % cols.
// `values` has the dtype of `dense` (the binding casts it first, as the reference does); duplicates accumulate.
cudaError_t scatter_add(void* dense, DType dtype, int64_t cols, int64_t stride_row, int64_t stride_col,
                        const void* indices, bool indices_int64, const void* values, int64_t num_entries,
                        cudaStream_t stream);

// How sddmm_gather splits its work (peft_sparse_plan::sddmm_plan, csrc/sddmm_plan.h); the binding computes it and
// allocates `splits * num_entries` accumulators of workspace.
using peft_sparse_plan::SddmmPlan;

// out[i] = sum_n grad_output[n, row_i] * input[n, col_i]; out and workspace are float (double for float64 inputs).
cudaError_t sddmm_gather(const void* grad_output, int64_t grad_stride_token, int64_t grad_stride_feature,
                         const void* input, int64_t input_stride_token, int64_t input_stride_feature, DType dtype,
                         int64_t num_tokens, int64_t in_features, const void* indices, bool indices_int64,
                         int64_t num_entries, const SddmmPlan& plan, void* workspace, void* out,
                         cudaStream_t stream);

// Dequantise a bitsandbytes 4-bit weight of `numel` elements to `out_dtype` with a sparse fp32 delta added before
// the single final rounding. `absmax` is float32 per block, or (when nested_absmax != nullptr) uint8 codes of a
// blockwise-quantised absmax: absmax[b] = nested_code[absmax_q[b]] * nested_absmax[b / nested_blocksize] + offset.
// `indices` must be sorted ascending (duplicates allowed).
cudaError_t dequant_scatter(const uint8_t* packed, const void* absmax, const float* code, int64_t blocksize,
                            const float* nested_absmax, const float* nested_code, int64_t nested_blocksize,
                            float offset, int64_t numel, const void* indices, bool indices_int64,
                            const float* values, int64_t num_entries, void* out, DType out_dtype,
                            cudaStream_t stream);

}  // namespace peft_sparse_cuda
