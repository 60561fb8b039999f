// CUDA registrations of the peft-sparse ops: check tensors (csrc/op_checks.h: the index range costs one reduction
// and one host synchronisation per call), plan sddmm_gather's launch (csrc/sddmm_plan.h), allocate outputs and
// workspaces, get the current stream, call the launchers of csrc/cuda/kernels.cu. The only CUDA file that knows
// torch. Built only by the CUDAExtension (setup.py, when nvcc and a CUDA-enabled torch are present).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include <vector>

#include "../op_checks.h"
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

void check_cuda(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(status));
}

void scatter_add_cuda(at::Tensor dense, const at::Tensor& indices, const at::Tensor& values) {
  peft_sparse_checks::check_scatter_add(dense, indices, values);
  if (indices.size(0) == 0) return;
  const c10::cuda::CUDAGuard guard(dense.device());
  const at::Tensor cast_values = values.to(dense.device(), dense.scalar_type()).contiguous();
  const at::Tensor flat_indices = indices.contiguous();
  check_cuda(peft_sparse_cuda::scatter_add(dense.data_ptr(), to_kernel_dtype(dense.scalar_type(), "scatter_add_"),
                                           dense.size(1), dense.stride(0), dense.stride(1),
                                           flat_indices.data_ptr(), flat_indices.scalar_type() == at::kLong,
                                           cast_values.data_ptr(), flat_indices.size(0),
                                           c10::cuda::getCurrentCUDAStream()),
             "scatter_add_");
}

at::Tensor sddmm_gather_cuda(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& indices,
                             int64_t in_features) {
  peft_sparse_checks::check_sddmm_gather(grad_output, input, indices, in_features);
  const c10::cuda::CUDAGuard guard(input.device());
  const bool fp64 = input.scalar_type() == at::kDouble;
  const int64_t k = indices.size(0), num_tokens = input.size(0);
  at::Tensor out = at::empty({k}, input.options().dtype(fp64 ? at::kDouble : at::kFloat));
  if (k == 0) return out;
  const DType dtype = to_kernel_dtype(input.scalar_type(), "sddmm_gather");
  int num_sms = 0;
  check_cuda(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, input.device().index()),
             "sddmm_gather");
  const auto plan = peft_sparse_plan::sddmm_plan(num_tokens, in_features, k, input.element_size(), num_sms);
  at::Tensor workspace;
  if (plan.splits > 1) workspace = at::empty({plan.splits * k}, out.options());
  const at::Tensor flat_indices = indices.contiguous();
  // The kernel streams each entry's two token vectors; token-contiguous copies (one transpose of each operand,
  // cheap next to the gather) make those reads 16-byte vectors.
  const at::Tensor grad_t = grad_output.stride(0) == 1 ? grad_output : grad_output.t().contiguous().t();
  const at::Tensor input_t = input.stride(0) == 1 ? input : input.t().contiguous().t();
  check_cuda(peft_sparse_cuda::sddmm_gather(grad_t.data_ptr(), grad_t.stride(0), grad_t.stride(1),
                                            input_t.data_ptr(), input_t.stride(0), input_t.stride(1), dtype,
                                            num_tokens, in_features, flat_indices.data_ptr(),
                                            flat_indices.scalar_type() == at::kLong, k, plan,
                                            plan.splits > 1 ? workspace.data_ptr() : nullptr, out.data_ptr(),
                                            c10::cuda::getCurrentCUDAStream()),
             "sddmm_gather");
  return out;
}

at::Tensor dequant_scatter_cuda(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                                int64_t blocksize, c10::SymIntArrayRef shape, at::ScalarType out_dtype,
                                const at::Tensor& indices, const at::Tensor& values,
                                const std::optional<at::Tensor>& nested_absmax,
                                const std::optional<at::Tensor>& nested_code, int64_t nested_blocksize,
                                double offset) {
  const auto layout = peft_sparse_checks::check_dequant_scatter(packed, absmax, code, blocksize, shape, out_dtype,
                                                                indices, values, nested_absmax, nested_code,
                                                                nested_blocksize);
  const int64_t numel = layout.numel;
  const bool nested = layout.nested;
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty(layout.sizes, packed.options().dtype(out_dtype));
  if (numel == 0) return out;
  const at::Tensor packed_c = packed.contiguous(), absmax_c = absmax.contiguous();
  const at::Tensor code_c = code.to(at::kFloat).contiguous();
  const at::Tensor indices_c = indices.contiguous(), values_f = values.to(at::kFloat).contiguous();
  at::Tensor nested_absmax_c, nested_code_c;
  if (nested) {
    nested_absmax_c = nested_absmax->to(at::kFloat).contiguous();
    nested_code_c = nested_code->to(at::kFloat).contiguous();
  }
  check_cuda(peft_sparse_cuda::dequant_scatter(
                 packed_c.data_ptr<uint8_t>(), absmax_c.data_ptr(), code_c.data_ptr<float>(), blocksize,
                 nested ? nested_absmax_c.data_ptr<float>() : nullptr,
                 nested ? nested_code_c.data_ptr<float>() : nullptr, nested_blocksize, static_cast<float>(offset),
                 numel, indices_c.data_ptr(), indices_c.scalar_type() == at::kLong, values_f.data_ptr<float>(),
                 indices_c.size(0), out.data_ptr(), to_kernel_dtype(out_dtype, "dequant_scatter"),
                 c10::cuda::getCurrentCUDAStream()),
             "dequant_scatter");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(peft_sparse, CUDA, m) {
  m.impl("scatter_add_", &scatter_add_cuda);
  m.impl("sddmm_gather", &sddmm_gather_cuda);
  m.impl("dequant_scatter", &dequant_scatter_cuda);
}
