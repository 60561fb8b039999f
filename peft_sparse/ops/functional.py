"""The public ops: each call goes to the compiled kernels or to the reference, as :func:`backend` decides for the
device of its tensors. Contracts are those of ``reference.py``, the judge every backend is tested against."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import dense_rows, reference
from ._backend import backend

__all__ = ["dequant_scatter", "dequant_scatter_4bit", "scatter_add", "sddmm_gather"]


def scatter_add(dense: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``dense.view(out, in)[divmod(indices, in)] += values.to(dense.dtype)`` in place; returns ``dense``.

    ``dense`` may be a strided view (the transpose of a ``Conv1D`` weight). Duplicate indices accumulate.
    """
    if backend(dense.device) == "reference":
        return reference.scatter_add(dense, indices, values)
    torch.ops.peft_sparse.scatter_add_(dense, indices, values)
    return dense


def sddmm_gather(
    grad_output: torch.Tensor, input: torch.Tensor, indices: torch.Tensor, in_features: int
) -> torch.Tensor:
    """``g[i] = sum_n grad_output[n, row_i] * input[n, col_i]`` without the dense ``out x in`` product; fp32 result
    (fp64 for fp64 inputs). ``PEFT_SPARSE_SDDMM`` can route it through dense row blocks instead
    (:mod:`peft_sparse.ops.dense_rows`)."""
    if backend(input.device) == "reference":
        return reference.sddmm_gather(grad_output, input, indices, in_features)
    out_features = grad_output.shape[1] if grad_output.dim() == 2 else 0  # (bad shapes: refused by either path)
    if dense_rows.sddmm_plan(input.device, indices.numel(), out_features, in_features) == "dense":
        return dense_rows.sddmm_gather_dense_rows(grad_output, input, indices, in_features)
    return torch.ops.peft_sparse.sddmm_gather(grad_output, input, indices, in_features)


def dequant_scatter(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    out_dtype: torch.dtype,
    indices: torch.Tensor,
    values: torch.Tensor,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    nested_blocksize: int = 256,
    offset: float = 0.0,
) -> torch.Tensor:
    """A bitsandbytes 4-bit weight dequantised with a sparse delta added, in one pass; see
    :func:`peft_sparse.ops.reference.dequant_scatter`. ``indices`` must be sorted ascending (duplicates allowed)."""
    if backend(packed.device) == "reference":
        return reference.dequant_scatter(
            packed,
            absmax,
            code,
            blocksize,
            shape,
            out_dtype,
            indices,
            values,
            nested_absmax,
            nested_code,
            nested_blocksize,
            offset,
        )
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)  # bitsandbytes may store the bytes in another `quant_storage` dtype
    return torch.ops.peft_sparse.dequant_scatter(
        packed,
        absmax,
        code,
        blocksize,
        list(shape),
        out_dtype,
        indices,
        values,
        nested_absmax,
        nested_code,
        nested_blocksize,
        float(offset),
    )


def dequant_scatter_4bit(
    packed: torch.Tensor,
    quant_state: Any,
    indices: torch.Tensor,
    values: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """:func:`dequant_scatter` driven by a bitsandbytes ``QuantState`` (``Linear4bit.weight.quant_state``).

    Args:
        packed: the packed 4-bit weight (``Params4bit`` data).
        quant_state: its ``QuantState``; read for ``absmax``, ``code``, ``blocksize``, ``shape``, ``dtype`` and,
            with double quantisation, ``state2`` and ``offset``.
        indices: sorted row-major positions of the delta in the ``(out, in)`` weight.
        values: the delta's values (any float dtype; added in fp32).
        out_dtype: dtype of the result; defaults to ``quant_state.dtype``.
    """
    nested = bool(getattr(quant_state, "nested", False))
    state2 = quant_state.state2 if nested else None
    return dequant_scatter(
        packed,
        quant_state.absmax,
        quant_state.code,
        int(quant_state.blocksize),
        tuple(quant_state.shape),
        out_dtype or quant_state.dtype,
        indices,
        values,
        nested_absmax=state2.absmax if nested else None,
        nested_code=state2.code if nested else None,
        nested_blocksize=int(state2.blocksize) if nested else 256,
        offset=float(quant_state.offset) if nested else 0.0,
    )
