// CUDA registrations of the peft-sparse ops: check tensors, allocate outputs and workspaces, get the current
// stream, call the launchers of csrc/cuda/kernels.cu. The only CUDA file that knows torch. Built only by the
// CUDAExtension (setup.py, when nvcc and a CUDA-enabled torch are present).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <vector>

#include "kernels.h"

namespace {

using peft_sparse_cuda::DType;

DType to_kernel_dtype(at::ScalarType type, const char* op) {
  switch (type) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default: TORCH_CHECK_TYPE(false, op, ": unsupported dtype ", type);
  }
  return DType::Float32;  // unreachable: TORCH_CHECK_TYPE(false, ...) throws
}

void check_indices_tensor(const at::Tensor& indices, const at::Tensor& like, const char* op) {
  TORCH_CHECK_VALUE(indices.dim() == 1, op, ": indices must be 1-D, got shape ", indices.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong, op,
                   ": indices must be int32 or int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.device() == like.device(), op, ": indices are on ", indices.device(), ", expected ",
                    like.device());
}

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(status));
}

void scatter_add_cuda(at::Tensor dense, const at::Tensor& indices, const at::Tensor& values) {
  TORCH_CHECK_VALUE(dense.dim() == 2, "scatter_add_: dense must be 2-D, got shape ", dense.sizes());
  check_indices_tensor(indices, dense, "scatter_add_");
  TORCH_CHECK_VALUE(values.dim() == 1 && values.size(0) == indices.size(0),
                    "scatter_add_: values must be 1-D with one value per index, got shapes ", values.sizes(),
                    " and ", indices.sizes());
  if (indices.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(dense.device());
  const at::Tensor cast_values = values.to(dense.device(), dense.scalar_type()).contiguous();
  const at::Tensor flat_indices = indices.contiguous();
  check_launch(peft_sparse_cuda::scatter_add(dense.data_ptr(), to_kernel_dtype(dense.scalar_type(), "scatter_add_"),
                                             dense.size(1), dense.stride(0), dense.stride(1),
                                             flat_indices.data_ptr(), flat_indices.scalar_type() == at::kLong,
                                             cast_values.data_ptr(), flat_indices.size(0),
                                             at::cuda::getCurrentCUDAStream()),
               "scatter_add_");
}

at::Tensor sddmm_gather_cuda(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices,
                             int64_t in_features) {
  TORCH_CHECK_VALUE(grad_output.dim() == 2 && input.dim() == 2 && grad_output.size(0) == input.size(0),
                    "sddmm_gather: expected grad_output (N, out) and input (N, in), got ", grad_output.sizes(),
                    " and ", input.sizes());
  TORCH_CHECK_VALUE(input.size(1) == in_features, "sddmm_gather: input has ", input.size(1),
                    " features, expected in_features=", in_features);
  TORCH_CHECK_TYPE(grad_output.scalar_type() == input.scalar_type(), "sddmm_gather: grad_output is ",
                   grad_output.scalar_type(), " but input is ", input.scalar_type());
  check_indices_tensor(indices, input, "sddmm_gather");
  const c10::cuda::CUDAGuard guard(input.device());
  const bool fp64 = input.scalar_type() == at::kDouble;
  const int64_t k = indices.size(0), num_tokens = input.size(0);
  at::Tensor out = at::empty({k}, input.options().dtype(fp64 ? at::kDouble : at::kFloat));
  if (k == 0) return out;
  const DType dtype = to_kernel_dtype(input.scalar_type(), "sddmm_gather");
  const auto plan =
      peft_sparse_cuda::sddmm_plan(num_tokens, in_features, k, dtype, input.device().index());
  at::Tensor workspace;
  if (plan.splits > 1) workspace = at::empty({plan.splits * k}, out.options());
  const at::Tensor flat_indices = indices.contiguous();
  check_launch(peft_sparse_cuda::sddmm_gather(grad_output.data_ptr(), grad_output.stride(0), grad_output.stride(1),
                                              input.data_ptr(), input.stride(0), input.stride(1), dtype,
                                              num_tokens, in_features, flat_indices.data_ptr(),
                                              flat_indices.scalar_type() == at::kLong, k, plan,
                                              plan.splits > 1 ? workspace.data_ptr() : nullptr, out.data_ptr(),
                                              at::cuda::getCurrentCUDAStream()),
               "sddmm_gather");
  return out;
}

at::Tensor dequant_scatter_cuda(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                                int64_t blocksize, c10::SymIntArrayRef shape, at::ScalarType out_dtype,
                                const at::Tensor& indices, const at::Tensor& values,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code, int64_t nested_blocksize,
                                double offset) {
  std::vector<int64_t> sizes;
  int64_t numel = 1;
  for (const auto& s : shape) {
    sizes.push_back(s.expect_int());
    numel *= sizes.back();
  }
  TORCH_CHECK_VALUE(blocksize > 0, "dequant_scatter: blocksize must be positive, got ", blocksize);
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kByte, "dequant_scatter: packed must be uint8, got ",
                   packed.scalar_type());
  TORCH_CHECK_VALUE(packed.numel() * 2 >= numel, "dequant_scatter: packed holds ", packed.numel() * 2,
                    " 4-bit values, shape ", sizes, " needs ", numel);
  TORCH_CHECK_VALUE(code.numel() == 16, "dequant_scatter: code must have 16 entries, got ", code.numel());
  TORCH_CHECK_TYPE(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16,
                   "dequant_scatter: out_dtype must be float32, float16 or bfloat16, got ", out_dtype);
  check_indices_tensor(indices, packed, "dequant_scatter");
  TORCH_CHECK_VALUE(values.dim() == 1 && values.size(0) == indices.size(0),
                    "dequant_scatter: values must be 1-D with one value per index");
  const bool nested = nested_absmax.has_value();
  TORCH_CHECK_VALUE(nested == nested_code.has_value(),
                    "dequant_scatter: nested_absmax and nested_code must be given together");
  const int64_t num_blocks = (numel + blocksize - 1) / blocksize;
  TORCH_CHECK_VALUE(absmax.numel() >= num_blocks, "dequant_scatter: absmax has ", absmax.numel(),
                    " entries, expected ", num_blocks);
  TORCH_CHECK_TYPE(absmax.scalar_type() == (nested ? at::kByte : at::kFloat), "dequant_scatter: absmax must be ",
                   nested ? "uint8 (double quantisation)" : "float32", ", got ", absmax.scalar_type());
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty(sizes, packed.options().dtype(out_dtype));
  if (numel == 0) return out;
  const at::Tensor packed_c = packed.contiguous(), absmax_c = absmax.contiguous();
  const at::Tensor code_c = code.to(at::kFloat).contiguous();
  const at::Tensor indices_c = indices.contiguous(), values_f = values.to(at::kFloat).contiguous();
  at::Tensor nested_absmax_c, nested_code_c;
  if (nested) {
    nested_absmax_c = nested_absmax->to(at::kFloat).contiguous();
    nested_code_c = nested_code->to(at::kFloat).contiguous();
    TORCH_CHECK_VALUE(nested_code_c.numel() == 256, "dequant_scatter: nested_code must have 256 entries");
  }
  check_launch(peft_sparse_cuda::dequant_scatter(
                   packed_c.data_ptr<uint8_t>(), absmax_c.data_ptr(), code_c.data_ptr<float>(), blocksize,
                   nested ? nested_absmax_c.data_ptr<float>() : nullptr,
                   nested ? nested_code_c.data_ptr<float>() : nullptr, nested_blocksize, static_cast<float>(offset),
                   numel, indices_c.data_ptr(), indices_c.scalar_type() == at::kLong, values_f.data_ptr<float>(),
                   indices_c.size(0), out.data_ptr(), to_kernel_dtype(out_dtype, "dequant_scatter"),
                   at::cuda::getCurrentCUDAStream()),
               "dequant_scatter");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(peft_sparse, CUDA, m) {
  m.impl("scatter_add_", &scatter_add_cuda);
  m.impl("sddmm_gather", &sddmm_gather_cuda);
  m.impl("dequant_scatter", &dequant_scatter_cuda);
}
