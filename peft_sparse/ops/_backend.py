"""Choose, once per device type, which implementation serves the peft-sparse ops.

Order of preference:

1. the compiled extension ``peft_sparse._C`` (built by ``setup.py``);
2. a JIT build of the same sources with ``torch.utils.cpp_extension.load`` (cached by torch under
   ``TORCH_EXTENSIONS_DIR``), when ``_C`` is missing;
3. for CUDA tensors when the extension has no CUDA kernels: CuPy compiling ``csrc/cuda/kernels.cu`` with NVRTC;
4. the pure-PyTorch reference (``reference.py``).

Steps 1-2 provide the op schemas (namespace ``peft_sparse``) and the CPU kernels; a CUDA-enabled build also the
CUDA kernels. Loading happens lazily, at the first op call, not at import.

The C++/CUDA sources that steps 2-3 compile are found by :func:`sources_dir` (``CSRC``): an installed wheel ships
them as package data in ``peft_sparse/_csrc/`` (``setup.py`` copies the top-level ``csrc/`` there at build time);
an editable install or a plain checkout has none there and uses the checkout's ``csrc/``.

Environment variables:

- ``PEFT_SPARSE_FORCE_REFERENCE=1`` (read at every op call) selects the reference everywhere, which is how to rule
  a kernel bug in or out while debugging;
- ``PEFT_SPARSE_FORCE_JIT=1`` (read when the extension loads, at the first op call) skips the prebuilt
  ``peft_sparse._C`` and JIT-builds the sources (step 2), which is how CI checks that an installed wheel's shipped
  sources build. It has no effect once something else in the process has imported ``peft_sparse._C``.
"""

from __future__ import annotations

import os
import subprocess
import threading
import warnings
from pathlib import Path

import torch

FORCE_REFERENCE_ENV = "PEFT_SPARSE_FORCE_REFERENCE"
FORCE_JIT_ENV = "PEFT_SPARSE_FORCE_JIT"
BACKENDS = ("cpp", "cuda", "cupy", "reference")


def sources_dir() -> Path:
    """The directory of the C++/CUDA sources: the copy a wheel ships in ``peft_sparse/_csrc/``, else the
    checkout's top-level ``csrc/`` (editable installs and plain checkouts)."""
    package = Path(__file__).resolve().parents[1]
    shipped = package / "_csrc"
    return shipped if shipped.is_dir() else package.parent / "csrc"


CSRC = sources_dir()

_lock = threading.Lock()
_state: dict = {}  # "extension": "prebuilt" | "jit" | None, "cuda": backend name, "error": str


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _reference_forced() -> bool:
    return _env_flag(FORCE_REFERENCE_ENV)


def _ops_defined() -> bool:
    return hasattr(torch.ops, "peft_sparse") and hasattr(torch.ops.peft_sparse, "sddmm_gather")


def _jit_build() -> None:
    from torch.utils import cpp_extension

    sources = [CSRC / "ops.cpp", CSRC / "cpu" / "ops_cpu.cpp"]
    missing = [str(path) for path in sources if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"C++ sources not found (neither shipped in the package nor in a checkout): {missing}")
    # Same sources and flags as setup.py's build of peft_sparse._C (setup.py cannot import this package).
    cpp_extension.load(
        name="peft_sparse_jit",
        sources=[str(path) for path in sources],
        extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


def _load_extension() -> str | None:
    """Make the ``peft_sparse`` ops exist; return how ("prebuilt" or "jit"), or None if they could not be."""
    if _ops_defined():
        return "prebuilt"
    errors = []
    if _env_flag(FORCE_JIT_ENV):
        errors.append(f"peft_sparse._C: skipped ({FORCE_JIT_ENV} is set)")
    else:
        try:
            import peft_sparse._C  # noqa: F401  (registers the ops)

            return "prebuilt"
        except ImportError as error:
            errors.append(f"peft_sparse._C: {error}")
    # A missing compiler, ninja or source (OSError, RuntimeError from torch.utils.cpp_extension), a failed compile
    # (RuntimeError, or the compiler's CalledProcessError) or an unloadable library (OSError) all fall back.
    try:
        _jit_build()
        return "jit"
    except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as error:
        errors.append(f"JIT build: {error}")
    _state["error"] = "; ".join(errors)
    warnings.warn(
        "peft-sparse: no compiled kernels (" + _state["error"] + "); using the pure-PyTorch reference ops, which "
        "are correct but slower.",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def _initialise() -> None:
    with _lock:
        if "extension" in _state:
            return
        extension = _load_extension()
        if extension is not None:
            from . import _library

            _library.register_fakes()
        _state["extension"] = extension


def _cuda_backend() -> str:
    if "cuda" in _state:
        return _state["cuda"]
    with _lock:
        if "cuda" not in _state:
            choice = "reference"
            if _state.get("extension") and torch.cuda.is_available():
                if torch._C._dispatch_has_kernel_for_dispatch_key("peft_sparse::sddmm_gather", "CUDA"):
                    choice = "cuda"
                else:
                    from . import _cupy

                    if _cupy.register(CSRC):
                        choice = "cupy"
            _state["cuda"] = choice
    return _state["cuda"]


def backend(device: str | torch.device = "cpu") -> str:
    """Return the name of the implementation that serves tensors on ``device``: ``"cpp"`` (compiled C++ kernels),
    ``"cuda"`` (compiled CUDA kernels), ``"cupy"`` (the CUDA kernels compiled at run time by CuPy/NVRTC) or
    ``"reference"`` (pure PyTorch)."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if _reference_forced():
        return "reference"
    if "extension" not in _state:
        _initialise()
    if device_type == "cpu":
        return "cpp" if _state["extension"] else "reference"
    if device_type == "cuda":
        return _cuda_backend()
    return "reference"


def extension_source() -> str | None:
    """How the compiled ops were obtained: ``"prebuilt"`` (``peft_sparse._C``), ``"jit"``, or ``None``."""
    if "extension" not in _state:
        _initialise()
    return _state["extension"]
