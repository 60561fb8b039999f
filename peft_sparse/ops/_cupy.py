"""CUDA kernels through CuPy/NVRTC, for CUDA tensors when ``peft_sparse._C`` was built without CUDA.

CuPy compiles ``csrc/cuda/kernels.cu`` (the very file the CUDA extension builds; its device part includes no
header) at run time, and this module registers Python implementations of the ``peft_sparse`` ops for the CUDA
dispatch key that launch its ``extern "C"`` kernels on torch's current stream. Outputs and workspaces are torch
tensors; only raw device pointers cross to CuPy.

What NVRTC does not compile (host code) comes from the CPU part of the extension, which this path runs on top of:
the index checks of the compiled ops (``peft_sparse::_check_indices``, ``csrc/op_checks.h``), so that out-of-range
or, for ``dequant_scatter``, unsorted indices raise the same ``ValueError`` here, and ``sddmm_gather``'s launch plan
(``peft_sparse::_sddmm_plan``, ``csrc/sddmm_plan.h``), so that both CUDA paths split and sum in the same order.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch

THREADS = 256
SDDMM_ENTRIES_PER_BLOCK = THREADS // 32  # one warp per entry: PS_WARPS_PER_BLOCK in kernels.cu
DEQUANT_TILE = 4096  # PS_DQ_TILE in kernels.cu
_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
_library = None
_sources: Path | None = None  # csrc/, given by register (the backend module knows where it is)


def _cupy():
    import cupy

    return cupy


@functools.cache
def _module(device_index: int):
    cupy = _cupy()
    source = (_sources / "cuda" / "kernels.cu").read_text()
    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=source, options=("-std=c++17",))


def _kernel(device: torch.device, name: str):
    return _module(device.index if device.index is not None else torch.cuda.current_device()).get_function(name)


def _launch(kernel, grid, args) -> None:
    """Launch with THREADS threads per block: tensors travel as device pointers, floats as the kernels' ``float``,
    ints as their ``long long`` (ps_i64)."""
    import numpy as np

    cupy = _cupy()
    converted = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            converted.append(np.uint64(arg.data_ptr()))
        elif isinstance(arg, float):
            converted.append(np.float32(arg))
        else:
            converted.append(np.int64(arg))
    with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
        kernel(grid, (THREADS,), tuple(converted))


def _checked_index_suffix(indices: torch.Tensor, numel: int, op: str, ascending: bool = False) -> str:
    """The kernels' name suffix for the index dtype, once the indices pass the compiled ops' checks (1-D, int32 or
    int64, in ``[0, numel)``; sorted too if ``ascending``)."""
    torch.ops.peft_sparse._check_indices(indices, numel, ascending, op)
    return "i64" if indices.dtype == torch.int64 else "i32"


def _blocks(count: int) -> tuple[int]:
    return (max(1, math.ceil(count / THREADS)),)


def scatter_add_cuda(dense: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    from . import reference

    if dense.dim() != 2:
        reference.scatter_add(dense, indices, values)  # raises the reference's ValueError
        return
    # The compiled op's order of checks: dense, then the indices (its messages), then the values.
    index_suffix = _checked_index_suffix(indices, dense.shape[0] * dense.shape[1], "scatter_add_")
    if values.shape != indices.shape:
        reference.scatter_add(dense, indices, values)  # raises the reference's ValueError
        return
    if indices.numel() == 0:
        return
    values = values.to(device=dense.device, dtype=dense.dtype).contiguous()
    indices = indices.contiguous()
    kernel = _kernel(dense.device, f"ps_scatter_add_{_SUFFIX[dense.dtype]}_{index_suffix}")
    _launch(
        kernel,
        _blocks(indices.numel()),
        (dense, dense.shape[1], dense.stride(0), dense.stride(1), indices, values, indices.numel()),
    )


def _token_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The same (N, features) values with the token dimension contiguous (stride 1), as the kernel reads fastest."""
    return tensor if tensor.stride(0) == 1 else tensor.t().contiguous().t()


def sddmm_gather_cuda(grad_output, input, indices, in_features):
    from . import reference

    if grad_output.dim() != 2 or input.dim() != 2 or input.shape[1] != in_features or grad_output.dtype != input.dtype:
        return reference.sddmm_gather(grad_output, input, indices, in_features)  # raises with the reference's message
    index_suffix = _checked_index_suffix(indices, grad_output.shape[1] * in_features, "sddmm_gather")
    accumulate = torch.float64 if input.dtype == torch.float64 else torch.float32
    k, num_tokens = indices.numel(), input.shape[0]
    if k == 0 or num_tokens == 0:
        return torch.zeros(k, dtype=accumulate, device=input.device)
    num_sms = torch.cuda.get_device_properties(input.device).multi_processor_count
    splits, tokens_per_split = torch.ops.peft_sparse._sddmm_plan(
        num_tokens, in_features, k, input.element_size(), num_sms
    )
    grad_output, input = _token_contiguous(grad_output), _token_contiguous(input)
    out = torch.empty(k, dtype=accumulate, device=input.device)
    partial = torch.empty(splits * k, dtype=accumulate, device=input.device) if splits > 1 else out
    indices = indices.contiguous()
    kernel = _kernel(input.device, f"ps_sddmm_gather_{_SUFFIX[input.dtype]}_{index_suffix}")
    _launch(
        kernel,
        (math.ceil(k / SDDMM_ENTRIES_PER_BLOCK), splits),
        (
            grad_output,
            grad_output.stride(0),
            grad_output.stride(1),
            input,
            input.stride(0),
            input.stride(1),
            num_tokens,
            in_features,
            indices,
            k,
            tokens_per_split,
            partial,
        ),
    )
    if splits > 1:
        reduce = _kernel(
            input.device, "ps_reduce_splits_f64" if accumulate == torch.float64 else "ps_reduce_splits_f32"
        )
        _launch(reduce, _blocks(k), (partial, splits, k, out))
    return out


def dequant_scatter_cuda(
    packed,
    absmax,
    code,
    blocksize,
    shape,
    out_dtype,
    indices,
    values,
    nested_absmax=None,
    nested_code=None,
    nested_blocksize=256,
    offset=0.0,
):
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"dequant_scatter: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    if (nested_absmax is None) != (nested_code is None):
        raise ValueError("dequant_scatter: nested_absmax and nested_code must be given together")
    numel = math.prod(shape)
    index_suffix = _checked_index_suffix(indices, numel, "dequant_scatter", ascending=True)
    out = torch.empty(tuple(shape), dtype=out_dtype, device=packed.device)
    if numel == 0:
        return out
    nested = nested_absmax is not None
    indices = indices.contiguous()
    values = values.to(torch.float32).contiguous()
    code = code.to(torch.float32).contiguous()
    null = torch.empty(0, device=packed.device)
    args = (
        packed.contiguous(),
        null if nested else absmax.contiguous(),
        absmax.contiguous() if nested else null,
        code,
        blocksize,
        nested_absmax.float().contiguous() if nested else null,
        nested_code.float().contiguous() if nested else null,
        nested_blocksize,
        float(offset),
        numel,
        indices,
        values,
        indices.numel(),
        out,
    )
    suffix = f"{_SUFFIX[out_dtype]}_{index_suffix}"
    # Two passes on one stream, as in kernels.cu: the dequantised stream, then each delta run's single rounding.
    _launch(_kernel(packed.device, f"ps_dequant_scatter_{suffix}"), (math.ceil(numel / DEQUANT_TILE),), args)
    if indices.numel():
        _launch(_kernel(packed.device, f"ps_dequant_fixup_{suffix}"), _blocks(indices.numel()), args)
    return out


def register(sources: Path) -> bool:
    """Register the CuPy implementations (compiled from ``sources/cuda/kernels.cu``) for the CUDA dispatch key;
    False if CuPy or a GPU is missing."""
    global _library, _sources
    if _library is not None:
        return True
    _sources = sources
    try:
        cupy = _cupy()
        if cupy.cuda.runtime.getDeviceCount() == 0:
            return False
        _module(torch.cuda.current_device())  # compile now, so that a broken toolchain fails here, not mid-step
    except Exception:  # noqa: BLE001  (CuPy's CompileException derives from Exception alone)
        return False  # no CuPy, no driver, or NVRTC failed: the reference serves CUDA tensors instead
    library = torch.library.Library("peft_sparse", "IMPL")
    library.impl("scatter_add_", scatter_add_cuda, "CUDA")
    library.impl("sddmm_gather", sddmm_gather_cuda, "CUDA")
    library.impl("dequant_scatter", dequant_scatter_cuda, "CUDA")
    _library = library
    return True
