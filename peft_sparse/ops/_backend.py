"""Choose, once per device type, which implementation serves the peft-sparse ops.

The order of preference is: the compiled ``peft_sparse._C`` extension, a JIT build of the same sources, CuPy/NVRTC
for CUDA tensors, and last the pure-PyTorch reference. Only the reference exists so far; the compiled backends plug
in behind :func:`backend` without changing any caller. Setting ``PEFT_SPARSE_FORCE_REFERENCE=1`` always selects the
reference, which is useful to rule out a kernel bug while debugging.
"""

from __future__ import annotations

import os

import torch

FORCE_REFERENCE_ENV = "PEFT_SPARSE_FORCE_REFERENCE"

BACKENDS = ("cpp", "cuda", "cupy", "reference")


def _reference_forced() -> bool:
    return os.environ.get(FORCE_REFERENCE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def backend(device: str | torch.device = "cpu") -> str:
    """Return the name of the backend that serves tensors on ``device``: one of ``"cpp"``, ``"cuda"``, ``"cupy"``
    or ``"reference"``."""
    torch.device(device)  # validates the argument, raising on a malformed device string
    if _reference_forced():
        return "reference"
    return "reference"
