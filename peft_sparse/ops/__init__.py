"""Numerical core of peft-sparse: the ops every sparse layer is built on.

Public functions dispatch through :func:`backend` (compiled C++/CUDA kernels, CuPy, or the pure-PyTorch
reference); see ``reference.py`` for each op's exact contract.
"""

from ._backend import FORCE_REFERENCE_ENV, backend, extension_source
from .functional import dequant_scatter, dequant_scatter_4bit, scatter_add, sddmm_gather
from .sparse_linear import merged_weight, sparse_linear

__all__ = [
    "FORCE_REFERENCE_ENV",
    "backend",
    "dequant_scatter",
    "dequant_scatter_4bit",
    "extension_source",
    "merged_weight",
    "scatter_add",
    "sddmm_gather",
    "sparse_linear",
]
