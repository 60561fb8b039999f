"""The CUDA sources compile the ways the package uses them, on any machine: NVRTC (the CuPy path compiles
``csrc/cuda/kernels.cu`` at run time, with no include path) and ``nvcc -c`` (the CUDAExtension build). Neither needs
a GPU; running the kernels does, and that is in test_ops.py's CUDA cases. What the CuPy path takes from the CPU
part of the extension (the launch plan, the index checks) is checked here on the CPU.

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
import torch

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
    options = [b"-std=c++17", f"--gpu-architecture={arch}".encode()]
    status, log, ptx = _nvrtc_compile(library, KERNELS_CU.read_bytes(), options)
    assert status == 0, log
    entries = set(re.findall(rb"\.entry\s+(\w+)", ptx))
    missing = [name for name in EXPECTED_KERNELS if name.encode() not in entries]
    assert not missing, f"kernels missing from the PTX: {missing}"


def test_kernels_compile_with_nvcc(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found on this machine")
    result = subprocess.run(
        [
            "nvcc",
            "-c",
            "-O3",
            "-std=c++17",
            "-gencode",
            "arch=compute_80,code=sm_80",
            str(KERNELS_CU),
            "-o",
            str(tmp_path / "kernels.o"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
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


# (num_tokens, in_features, num_entries, element_size, num_sms) -> (splits, tokens_per_split), as the plan's former
# C++ and Python copies both computed it: pinned, since the plan fixes the order of sddmm_gather's CUDA sums.
PLAN_CASES = [
    ((1000, 4096, 100, 2, 132), (16, 64)),  # few entries: splits to fill the GPU
    ((1, 7, 20, 4, 108), (1, 8)),
    ((0, 5, 3, 4, 80), (1, 8)),  # no tokens: one (empty) range
    ((65536, 4096, 10**6, 2, 132), (32, 2048)),  # many entries: ranges sized for L2
    ((10**6, 14336, 10, 4, 132), (128, 7816)),  # capped at 128 splits
    ((300, 3, 1, 8, 1), (5, 64)),
]


@pytest.fixture
def extension():
    """The compiled ops loaded (the helper ops below live in the CPU part of the extension)."""
    from peft_sparse import ops

    assert ops.backend("cpu") == "cpp", "the C++ extension did not load; see the RuntimeWarning for why"


@pytest.mark.parametrize("args,expected", PLAN_CASES)
def test_sddmm_launch_plan(extension, args, expected):
    """The one definition of the plan (csrc/sddmm_plan.h), as the CuPy path reads it through the extension."""
    splits, tokens_per_split = torch.ops.peft_sparse._sddmm_plan(*args)
    assert (splits, tokens_per_split) == expected
    tokens = max(args[0], 1)
    assert tokens_per_split % 8 == 0 and 1 <= splits <= 128
    assert (splits - 1) * tokens_per_split < tokens <= splits * tokens_per_split  # no empty range


def test_sddmm_launch_plan_rejects_bad_arguments(extension):
    with pytest.raises(ValueError, match="element_size must be positive, got 0"):
        torch.ops.peft_sparse._sddmm_plan(10, 10, 10, 0, 1)
    with pytest.raises(ValueError, match="num_sms must be positive, got -1"):
        torch.ops.peft_sparse._sddmm_plan(10, 10, 10, 4, -1)


def _error(call) -> tuple[type, str]:
    with pytest.raises((ValueError, TypeError)) as caught:
        call()
    return caught.type, str(caught.value).splitlines()[0]


def _cupy_and_compiled_calls(op: str, indices: torch.Tensor):
    """The CuPy implementation of `op` and the compiled op, on CPU tensors of a (6, 10) weight."""
    values = torch.zeros(indices.shape[0])
    if op == "sddmm_gather":
        args = (torch.zeros(4, 6), torch.zeros(4, 10), indices, 10)
        return (lambda: _cupy.sddmm_gather_cuda(*args)), (lambda: torch.ops.peft_sparse.sddmm_gather(*args))
    if op == "scatter_add_":
        return (
            (lambda: _cupy.scatter_add_cuda(torch.zeros(6, 10), indices, values)),
            (lambda: torch.ops.peft_sparse.scatter_add_(torch.zeros(6, 10), indices, values)),
        )
    args = (
        torch.zeros(30, dtype=torch.uint8),
        torch.ones(1),
        torch.zeros(16),
        64,
        [6, 10],
        torch.float32,
        indices,
        values,
    )
    return (lambda: _cupy.dequant_scatter_cuda(*args)), (lambda: torch.ops.peft_sparse.dequant_scatter(*args))


@pytest.mark.parametrize("op", ["sddmm_gather", "scatter_add_", "dequant_scatter"])
@pytest.mark.parametrize(
    "indices,message",
    [
        ([-2, 0, 5], "indices out of range [0, 60): they span [-2, 5]"),
        ([0, 5, 60], "indices out of range [0, 60): they span [0, 60]"),
        (torch.tensor([0.0, 1.0]), "indices must be int32 or int64, got Float"),
        (torch.tensor([[0, 1]]), "indices must be 1-D, got shape [1, 2]"),
    ],
    ids=["negative", "past_the_end", "float", "2d"],
)
def test_cupy_path_raises_what_the_compiled_ops_raise(extension, op, indices, message):
    """The CuPy implementations check indices before any CuPy call, with the compiled ops' own checks, so on CPU
    tensors they raise exactly what the CPU kernels raise: the op, and the range the indices span."""
    indices = indices if isinstance(indices, torch.Tensor) else torch.tensor(indices)
    cupy_call, compiled_call = _cupy_and_compiled_calls(op, indices)
    expected = _error(compiled_call)
    assert expected[1] == f"{op}: {message}"
    assert _error(cupy_call) == expected


def test_cupy_dequant_scatter_requires_sorted_indices_as_the_compiled_op_does(extension):
    cupy_call, compiled_call = _cupy_and_compiled_calls("dequant_scatter", torch.tensor([7, 3, 5]))
    assert (
        _error(cupy_call) == _error(compiled_call) == (ValueError, "dequant_scatter: indices must be sorted ascending")
    )


def _cuda_include_dir() -> Path | None:
    nvcc = shutil.which("nvcc")
    candidates = [Path("/usr/local/cuda/include")]
    if nvcc:
        candidates.insert(0, Path(nvcc).resolve().parents[1] / "include")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME:
        candidates.insert(0, Path(cpp_extension.CUDA_HOME) / "include")
    return next((path for path in candidates if (path / "cuda_runtime.h").is_file()), None)


@pytest.mark.slow
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
    command = [
        compiler,
        "-fsyntax-only",
        "-std=c++20",
        *includes,
        f"-I{tmp_path}",
        f"-I{cuda_include}",
        f"-I{sysconfig.get_paths()['include']}",
        "-DTORCH_EXTENSION_NAME=_C",
        str(KERNELS_CU.parent / "ops_cuda.cpp"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
