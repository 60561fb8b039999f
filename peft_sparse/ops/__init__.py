"""Numerical core of peft-sparse: the ops every sparse layer is built on.

Public functions dispatch through :func:`backend`; see ``reference.py`` for each op's exact contract.
"""

from ._backend import FORCE_REFERENCE_ENV, backend
from .reference import scatter_add, sddmm_gather
from .sparse_linear import merged_weight, sparse_linear

__all__ = ["FORCE_REFERENCE_ENV", "backend", "merged_weight", "scatter_add", "sddmm_gather", "sparse_linear"]
