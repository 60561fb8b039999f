// Schemas of the peft-sparse ops (namespace `peft_sparse`) and the Python module stub that loads them.
//
// Kernels register per device in csrc/cpu/ops_cpu.cpp and csrc/cuda/ops_cuda.cpp; fake (meta) implementations for
// torch.compile are registered from Python (peft_sparse/ops/_library.py). Contracts, in short (full text in
// peft_sparse/ops/reference.py, which is the judge):
//   scatter_add_(dense, indices, values): dense.view(out, in)[divmod(indices, in)] += values.to(dense.dtype),
//       in place, duplicates accumulate; dense may be strided (a transposed Conv1D weight).
//   sddmm_gather(grad_output, input, indices, in_features) -> g: g[i] = sum_n grad_output[n, row_i] *
//       input[n, col_i], accumulated (and returned) in fp32, or fp64 for fp64 inputs.
//   dequant_scatter(...) -> dense: a bitsandbytes 4-bit weight dequantised in fp32, plus a sorted sparse delta,
//       rounded once to out_dtype.
// Every op raises ValueError for indices outside the weight, [0, out * in) (csrc/op_checks.h).
//
// Two internal ops, with their one implementation here, serve the CuPy path (peft_sparse/ops/_cupy.py), which runs
// csrc/cuda/kernels.cu compiled by NVRTC (device code only) on top of this part of the extension:
//   _sddmm_plan(...) -> (splits, tokens_per_split): the CUDA sddmm_gather launch plan (csrc/sddmm_plan.h);
//   _check_indices(indices, numel, sorted, op): the index checks of every backend (csrc/op_checks.h): 1-D, int32
//       or int64, within [0, numel), ascending if `sorted`.
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "op_checks.h"
#include "sddmm_plan.h"

namespace {

std::tuple<int64_t, int64_t> sddmm_plan_op(int64_t num_tokens, int64_t in_features, int64_t num_entries,
                                           int64_t element_size, int64_t num_sms) {
  TORCH_CHECK_VALUE(element_size > 0, "_sddmm_plan: element_size must be positive, got ", element_size);
  TORCH_CHECK_VALUE(num_sms > 0, "_sddmm_plan: num_sms must be positive, got ", num_sms);
  const auto plan = peft_sparse_plan::sddmm_plan(num_tokens, in_features, num_entries, element_size, num_sms);
  return {plan.splits, plan.tokens_per_split};
}

void check_indices_op(const at::Tensor& indices, int64_t numel, bool sorted, c10::string_view op) {
  const std::string name(op);
  peft_sparse_checks::check_indices(indices, indices, name.c_str());  // 1-D, int32 or int64
  peft_sparse_checks::check_index_range(indices, numel, sorted, name.c_str());
}

}  // namespace

TORCH_LIBRARY(peft_sparse, m) {
  m.def("scatter_add_(Tensor(a!) dense, Tensor indices, Tensor values) -> ()");
  m.def("sddmm_gather(Tensor grad_output, Tensor input, Tensor indices, int in_features) -> Tensor");
  m.def(
      "dequant_scatter(Tensor packed, Tensor absmax, Tensor code, int blocksize, SymInt[] shape, "
      "ScalarType out_dtype, Tensor indices, Tensor values, Tensor? nested_absmax=None, Tensor? nested_code=None, "
      "int nested_blocksize=256, float offset=0.0) -> Tensor");
  // Device-independent (composite) kernels: the plan takes no tensor; the check runs ATen ops on any device.
  m.def("_sddmm_plan(int num_tokens, int in_features, int num_entries, int element_size, int num_sms) -> (int, int)",
        &sddmm_plan_op);
  m.def("_check_indices(Tensor indices, int numel, bool sorted, str op) -> ()", &check_indices_op);
}

// `import peft_sparse._C` runs the static registrations above; the module itself exposes nothing.
#define PS_STRINGIFY_(x) #x
#define PS_STRINGIFY(x) PS_STRINGIFY_(x)
#define PS_CONCAT_(a, b) a##b
#define PS_CONCAT(a, b) PS_CONCAT_(a, b)

extern "C" PyMODINIT_FUNC PS_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, PS_STRINGIFY(TORCH_EXTENSION_NAME), nullptr, -1,
                                      nullptr};
  return PyModule_Create(&module);
}
