"""The CUDA sources compile the ways the package uses them, on any machine: NVRTC (the CuPy path compiles
``csrc/cuda/kernels.cu`` at run time, with no include path) and ``nvcc -c`` (the CUDAExtension build). Neither needs
a GPU; running the kernels does, and that is in test_kernels.py's CUDA cases.

NVRTC comes from the ``nvidia-cuda-nvrtc-cu12`` wheel (in the ``dev`` extra on x86-64 Linux), nvcc from the
machine; each check is skipped, with the reason, where its compiler is missing.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from peft_sparse.ops import _cupy

KERNELS_CU = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "kernels.cu"
EXPECTED_KERNELS = (
    [f"ps_scatter_add_{t}_{i}" for t in ("f32", "f64", "f16", "bf16") for i in ("i32", "i64")]
    + [f"ps_sddmm_gather_{t}_{i}" for t in ("f32", "f64", "f16", "bf16") for i in ("i32", "i64")]
    + [f"ps_dequant_scatter_{t}_{i}" for t in ("f32", "f16", "bf16") for i in ("i32", "i64")]
    + [f"ps_dequant_fixup_{t}_{i}" for t in ("f32", "f16", "bf16") for i in ("i32", "i64")]
    + ["ps_reduce_splits_f32", "ps_reduce_splits_f64"]
)


def _libnvrtc() -> Path | None:
    try:
        import nvidia.cuda_nvrtc
    except ImportError:
        return None
    for root in nvidia.cuda_nvrtc.__path__:
        candidates = sorted(p for p in Path(root, "lib").glob("libnvrtc.so*") if ".alt." not in p.name)
        if candidates:
            return candidates[0]
    return None


def _nvrtc_compile(library: Path, source: bytes, options: list[bytes]) -> tuple[int, str, bytes]:
    nvrtc = ctypes.CDLL(str(library))
    program = ctypes.c_void_p()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), source, b"kernels.cu", 0, None, None) == 0
    status = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    ptx = b""
    if status == 0:
        nvrtc.nvrtcGetPTXSize(program, ctypes.byref(size))
        buffer = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetPTX(program, buffer)
        ptx = buffer.value
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    return status, log.value.decode(errors="replace"), ptx


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_kernels_compile_with_nvrtc_and_export_every_entry_point(arch):
    library = _libnvrtc()
    if library is None:
        pytest.skip("NVRTC not installed (pip install nvidia-cuda-nvrtc-cu12, part of the dev extra on x86-64)")
    status, log, ptx = _nvrtc_compile(library, KERNELS_CU.read_bytes(), [b"-std=c++17", f"--gpu-architecture={arch}".encode()])
    assert status == 0, log
    entries = set(re.findall(rb"\.entry\s+(\w+)", ptx))
    missing = [name for name in EXPECTED_KERNELS if name.encode() not in entries]
    assert not missing, f"kernels missing from the PTX: {missing}"


def test_kernels_compile_with_nvcc(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found on this machine")
    result = subprocess.run(
        ["nvcc", "-c", "-O3", "-std=c++17", "-gencode", "arch=compute_80,code=sm_80", str(KERNELS_CU),
         "-o", str(tmp_path / "kernels.o")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr


def test_cupy_launch_constants_match_the_kernel_source():
    """The CuPy path sizes its grids from constants that must equal the kernel file's macros."""
    source = KERNELS_CU.read_text()

    def macro(name: str) -> int:
        return int(re.search(rf"#define {name} (\d+)", source).group(1))

    assert _cupy.THREADS == macro("PS_THREADS")
    assert "#define PS_WARPS_PER_BLOCK (PS_THREADS / 32)" in source  # one warp per sddmm entry
    assert _cupy.SDDMM_ENTRIES_PER_BLOCK == macro("PS_THREADS") // 32
    assert _cupy.DEQUANT_TILE == macro("PS_DQ_TILE")
    # the dequant kernel gives every thread PS_DQ_PER_THREAD consecutive elements of its block's tile
    assert macro("PS_DQ_TILE") == macro("PS_THREADS") * macro("PS_DQ_PER_THREAD")


def _cuda_include_dir() -> Path | None:
    nvcc = shutil.which("nvcc")
    candidates = [Path("/usr/local/cuda/include")]
    if nvcc:
        candidates.insert(0, Path(nvcc).resolve().parents[1] / "include")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME:
        candidates.insert(0, Path(cpp_extension.CUDA_HOME) / "include")
    return next((path for path in candidates if (path / "cuda_runtime.h").is_file()), None)


def test_cuda_binding_type_checks_against_the_torch_headers(tmp_path):
    """csrc/cuda/ops_cuda.cpp (the torch side of the CUDA build) through the compiler's full type check, on a
    machine whose torch has no CUDA: only the build-generated `cuda_cmake_macros.h`, absent from CPU wheels, is
    stubbed. Catches a wrong ATen call or signature before a GPU machine ever builds it."""
    import sysconfig

    from torch.utils import cpp_extension

    cuda_include = _cuda_include_dir()
    if cuda_include is None:
        pytest.skip("no CUDA toolkit headers (cuda_runtime.h) on this machine")
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    command = [compiler, "-fsyntax-only", "-std=c++20", *includes, f"-I{tmp_path}", f"-I{cuda_include}",
               f"-I{sysconfig.get_paths()['include']}", "-DTORCH_EXTENSION_NAME=_C",
               str(KERNELS_CU.parent / "ops_cuda.cpp")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
