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
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(peft_sparse, m) {
  m.def("scatter_add_(Tensor(a!) dense, Tensor indices, Tensor values) -> ()");
  m.def("sddmm_gather(Tensor grad_output, Tensor input, Tensor indices, int in_features) -> Tensor");
  m.def(
      "dequant_scatter(Tensor packed, Tensor absmax, Tensor code, int blocksize, SymInt[] shape, "
      "ScalarType out_dtype, Tensor indices, Tensor values, Tensor? nested_absmax=None, Tensor? nested_code=None, "
      "int nested_blocksize=256, float offset=0.0) -> Tensor");
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
