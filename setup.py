"""Build script. Metadata lives in pyproject.toml; this file adds the C++/CUDA extension ``peft_sparse._C``.

The extension needs torch at build time, so install with ``pip install --no-build-isolation`` after installing
torch (an isolated build environment would download its own, multi-GB torch). Without torch at build time, or with
``PEFT_SPARSE_BUILD_EXTENSION=0``, the package installs without ``_C`` and ``peft_sparse.ops`` falls back to a JIT
build of the same sources at first use, then to the pure-PyTorch reference.

The CUDA kernels are added (``CUDAExtension``) when torch was built with CUDA and ``nvcc`` is found; set
``PEFT_SPARSE_BUILD_CUDA=0`` to skip them, and ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0"``) to choose GPUs; where
none is set and no GPU is visible (a Docker build), they are built for ``DEFAULT_CUDA_ARCH_LIST``.

The sources stay in the top-level ``csrc/``; ``build_py`` copies them into the built package as
``peft_sparse/_csrc/`` (package data), so that an installed wheel can JIT-build them, and the CuPy path compile
``kernels.cu``, without a checkout (``peft_sparse/ops/_backend.py`` looks there first). An editable install copies
nothing: it reads the checkout's ``csrc/``.
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
SOURCE_PATTERNS = ("*.h", "*.cpp", "*.cu")  # also in MANIFEST.in, which puts them in the sdist
SHIPPED_SOURCES = Path("peft_sparse", "_csrc")  # the package-data copy, relative to the build directory


# The GPUs the CUDA kernels are built for where none is visible at build time (a Docker build, a CI runner) and
# TORCH_CUDA_ARCH_LIST is unset: Turing (T4), Ampere (A100, A10, RTX 30), Ada (L4, L40, RTX 40), Hopper (H100, H200),
# and PTX of the last for newer GPUs to JIT. Without it torch's own default fails there (an IndexError in
# cpp_extension, which looks for the visible GPUs' architectures).
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0+PTX"


def cuda_arch_list(environ, visible_gpus: int) -> str | None:
    """The ``TORCH_CUDA_ARCH_LIST`` to set for the build: ``None`` where the user chose one or a GPU is visible
    (torch then builds for the GPUs it sees), else :data:`DEFAULT_CUDA_ARCH_LIST`."""
    if environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or visible_gpus > 0:
        return None
    return DEFAULT_CUDA_ARCH_LIST


def _flag(name: str, default: str = "1") -> bool:
    return os.environ.get(name, default).strip().lower() not in {"0", "false", "no", "off"}


def _extensions():
    if not _flag("PEFT_SPARSE_BUILD_EXTENSION"):
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print(
            "peft-sparse: torch is not importable at build time; building without peft_sparse._C "
            "(use `pip install --no-build-isolation` after installing torch)",
            file=sys.stderr,
        )
        return [], {}

    sources = [str(p.relative_to(ROOT)) for p in (CSRC / "ops.cpp", CSRC / "cpu" / "ops_cpu.cpp")]
    # The C++ standard is left to torch.utils.cpp_extension, which picks the one its headers need.
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    with_cuda = (
        _flag("PEFT_SPARSE_BUILD_CUDA")
        and torch.version.cuda is not None
        and (cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None)
    )
    if with_cuda:
        arch_list = cuda_arch_list(os.environ, torch.cuda.device_count())
        if arch_list is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
            print(
                f"peft-sparse: no GPU visible and TORCH_CUDA_ARCH_LIST unset: building the CUDA kernels for {arch_list} "
                "(set TORCH_CUDA_ARCH_LIST to choose, PEFT_SPARSE_BUILD_CUDA=0 to skip them)",
                file=sys.stderr,
            )
        sources += [str(p.relative_to(ROOT)) for p in (CSRC / "cuda" / "ops_cuda.cpp", CSRC / "cuda" / "kernels.cu")]
        extension = cpp_extension.CUDAExtension(
            "peft_sparse._C",
            sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--fmad=true"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        extension = cpp_extension.CppExtension(
            "peft_sparse._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]
        )
    print(f"peft-sparse: building peft_sparse._C ({'C++ and CUDA' if with_cuda else 'C++'} kernels)", file=sys.stderr)
    return [extension], {"build_ext": cpp_extension.BuildExtension}


class BuildPyWithSources(build_py):
    """``build_py`` that also copies ``csrc/`` into the built package (see the module docstring)."""

    def _source_copies(self) -> list[tuple[Path, Path]]:
        sources = sorted({path for pattern in SOURCE_PATTERNS for path in CSRC.rglob(pattern)})
        return [(path, Path(self.build_lib) / SHIPPED_SOURCES / path.relative_to(CSRC)) for path in sources]

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # the editable package finds the checkout's csrc/ itself
            return
        for source, target in self._source_copies():
            self.mkpath(str(target.parent))
            self.copy_file(str(source), str(target))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if self.editable_mode:
            return outputs
        return outputs + [str(target) for _, target in self._source_copies()]


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass={**cmdclass, "build_py": BuildPyWithSources})
