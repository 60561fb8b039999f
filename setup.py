"""Build script. Metadata lives in pyproject.toml; this file adds the C++/CUDA extension ``peft_sparse._C``.

The extension needs torch at build time, so install with ``pip install --no-build-isolation`` after installing
torch (an isolated build environment would download its own, multi-GB torch). Without torch at build time, or with
``PEFT_SPARSE_BUILD_EXTENSION=0``, the package installs without ``_C`` and ``peft_sparse.ops`` falls back to a JIT
build of the same sources at first use, then to the pure-PyTorch reference.

The CUDA kernels are added (``CUDAExtension``) when torch was built with CUDA and ``nvcc`` is found; set
``PEFT_SPARSE_BUILD_CUDA=0`` to skip them, and ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0"``) to choose GPUs.

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
