"""Pure-PyTorch reference implementation of every peft-sparse op.

These functions are the ground truth the compiled kernels are tested against, and the fallback used when no
compiled backend is available. They favour clarity over speed, but they respect the package's memory contract:
nothing here allocates a dense ``out x in`` tensor except where the op's output *is* that tensor
(``scatter_add`` writes into a dense weight the caller owns).

Index convention: a sparse delta of a logical weight ``W`` of shape ``(out, in)`` is a pair
``(indices, values)`` where ``indices`` are row-major flat positions ``row * in + col``, in ``[0, out * in)``
(and, for ``dequant_scatter``, ascending). Every backend holds the ops to that contract (:func:`check_index_range`
here, ``csrc/op_checks.h`` for the kernels): on the CPU a bad index set raises ``ValueError`` naming the range it
spans; on CUDA the check is queued on the stream (a device-side assert), since reading it back would make the host
wait on every forward. Index sets are also validated in full where they enter a layer
(``SparseLayer.set_sparse_entries`` and adapter loading).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["check_index_range", "dequant_scatter", "scatter_add", "sddmm_gather"]

# The sampled gradient gather materialises two (tokens x chunk) tiles at a time; this bounds their element count so
# its temporary memory stays constant however many tokens or entries there are (2 x 2**22 fp32 = 32 MiB).
_GATHER_TILE_ELEMENTS = 1 << 22


def check_index_range(indices: torch.Tensor, numel: int, op: str, ascending: bool = False) -> None:
    """Refuse flat positions outside ``[0, numel)`` (or, with ``ascending``, out of order): see the module's index
    convention. The same check and message as the compiled ops'."""
    if indices.numel() == 0:
        return
    low, high = torch.aminmax(indices)
    in_order = (indices[1:] >= indices[:-1]).all() if ascending and indices.numel() > 1 else True
    if indices.is_cuda:
        valid = (low >= 0) & (high < numel) & in_order
        what = " or not sorted ascending" if ascending else ""
        torch._assert_async(valid, f"{op}: indices out of range [0, {numel}){what}")
        return
    if int(low) < 0 or int(high) >= numel:
        raise ValueError(f"{op}: indices out of range [0, {numel}): they span [{int(low)}, {int(high)}]")
    if ascending and not bool(in_order):
        raise ValueError(f"{op}: indices must be sorted ascending")


def scatter_add(dense: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Add ``values`` at the row-major flat ``indices`` of the 2-D tensor ``dense``, in place.

    ``dense`` may be a non-contiguous view (for example the transpose of a GPT-2 ``Conv1D`` weight, whose logical
    ``(out, in)`` layout is the transpose of its storage). Duplicate indices accumulate. ``values`` is cast to
    ``dense.dtype`` first, so the result is what a merge into a weight of that dtype gives.

    Args:
        dense: 2-D tensor of shape ``(out, in)``; modified in place.
        indices: 1-D integer tensor of flat positions in ``[0, out * in)``.
        values: 1-D floating tensor with as many elements as ``indices``.

    Returns:
        ``dense``, for chaining.
    """
    if dense.dim() != 2:
        raise ValueError(f"scatter_add: `dense` must be 2-D, got shape {tuple(dense.shape)}")
    if indices.shape != values.shape or indices.dim() != 1:
        raise ValueError(
            f"scatter_add: `indices` and `values` must be 1-D of equal length, got {tuple(indices.shape)} and "
            f"{tuple(values.shape)}"
        )
    if indices.numel() == 0:
        return dense
    check_index_range(indices, dense.numel(), "scatter_add_")
    row_indices, col_indices = torch.unravel_index(indices.to(device=dense.device, dtype=torch.int64), dense.shape)
    dense.index_put_((row_indices, col_indices), values.to(device=dense.device, dtype=dense.dtype), accumulate=True)
    return dense


def check_sddmm_shapes(grad_output: torch.Tensor, input: torch.Tensor, in_features: int) -> None:
    """``sddmm_gather``'s shape contract: ``grad_output (N, out)`` and ``input (N, in_features)``; ``ValueError``
    naming the shapes otherwise."""
    if grad_output.dim() != 2 or input.dim() != 2 or grad_output.shape[0] != input.shape[0]:
        raise ValueError(
            f"sddmm_gather: expected grad_output (N, out) and input (N, in), got {tuple(grad_output.shape)} and "
            f"{tuple(input.shape)}"
        )
    if input.shape[1] != in_features:
        raise ValueError(f"sddmm_gather: input has {input.shape[1]} features, expected in_features={in_features}")


def sddmm_gather(
    grad_output: torch.Tensor, input: torch.Tensor, indices: torch.Tensor, in_features: int
) -> torch.Tensor:
    """Sampled gradient gather: the weight gradient ``grad_output.T @ input`` read only at ``indices``.

    Computes ``g[i] = sum_n grad_output[n, row_i] * input[n, col_i]`` without materialising the dense
    ``(out, in)`` gradient. Work is done in tiles of entries so the temporary memory is bounded by
    ``_GATHER_TILE_ELEMENTS`` regardless of the number of tokens ``N`` or of entries ``k``.

    Args:
        grad_output: ``(N, out)`` gradient of the layer output, flattened over all leading dimensions.
        input: ``(N, in)`` layer input, flattened the same way.
        indices: 1-D integer tensor of row-major flat positions.
        in_features: ``in``, the width of the logical weight.

    Returns:
        A float32 tensor of shape ``(k,)`` (fp16/bf16 inputs are accumulated in fp32; float64 stays float64).
    """
    check_sddmm_shapes(grad_output, input, in_features)
    acc_dtype = torch.float64 if torch.float64 in (grad_output.dtype, input.dtype) else torch.float32
    num_entries = indices.numel()
    out = torch.empty(num_entries, dtype=acc_dtype, device=grad_output.device)
    if num_entries == 0:
        return out
    check_index_range(indices, grad_output.shape[1] * in_features, "sddmm_gather")
    num_tokens = max(grad_output.shape[0], 1)
    tile = max(1, _GATHER_TILE_ELEMENTS // num_tokens)
    positions = indices.to(device=grad_output.device, dtype=torch.int64)
    row_indices, col_indices = torch.unravel_index(positions, (grad_output.shape[1], in_features))
    for start in range(0, num_entries, tile):
        stop = min(start + tile, num_entries)
        grad_cols = grad_output.index_select(1, row_indices[start:stop]).to(acc_dtype)
        input_cols = input.index_select(1, col_indices[start:stop]).to(acc_dtype)
        out[start:stop] = (grad_cols * input_cols).sum(dim=0)
    return out


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
    """Dequantise a bitsandbytes 4-bit weight and add a sparse delta, rounding once to ``out_dtype``.

    Layout (bitsandbytes ``quantize_4bit``): the row-major flattened weight of ``prod(shape)`` elements is packed two
    per byte, element ``2j`` in the high nibble of byte ``j`` and element ``2j + 1`` in the low one. Element ``e``
    decodes to ``code[nibble] * absmax[e // blocksize]`` in fp32, where ``code`` is the 16-entry NF4 or FP4 table.
    With double quantisation (``nested_absmax`` given) ``absmax`` holds uint8 codes and the scale of block ``b`` is
    ``nested_code[absmax[b]] * nested_absmax[b // nested_blocksize] + offset``, each operation rounded to fp32, as
    bitsandbytes computes it. The fp32 ``values`` are then added at ``indices`` (row-major flat positions;
    duplicates accumulate) and the result is rounded once to ``out_dtype``.

    Returns:
        A new tensor of ``shape`` and ``out_dtype``; without a delta it equals
        ``bitsandbytes.functional.dequantize_4bit`` exactly.
    """
    if (nested_absmax is None) != (nested_code is None):
        raise ValueError("dequant_scatter: nested_absmax and nested_code must be given together")
    if blocksize <= 0:
        raise ValueError(f"dequant_scatter: blocksize must be positive, got {blocksize}")
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    packed_bytes = packed.reshape(-1).view(torch.uint8)
    if packed_bytes.numel() * 2 < numel:
        raise ValueError(
            f"dequant_scatter: packed holds {packed_bytes.numel() * 2} 4-bit values, shape {shape} needs {numel}"
        )
    nibbles = torch.stack([packed_bytes >> 4, packed_bytes & 15], dim=1).reshape(-1)[:numel].long()
    num_blocks = -(-numel // blocksize)
    if nested_absmax is not None:
        nested_scales = nested_absmax.float().repeat_interleave(nested_blocksize)[:num_blocks]
        scales = nested_code.float()[absmax.reshape(-1)[:num_blocks].long()] * nested_scales
        scales = scales + torch.tensor(offset, dtype=torch.float32, device=scales.device)
    else:
        scales = absmax.reshape(-1)[:num_blocks].float()
    dense = code.float().to(packed.device)[nibbles] * scales.repeat_interleave(blocksize)[:numel]
    # the delta addresses the row-major (rows, last dim) view of the weight
    dense = dense.reshape(math.prod(shape[:-1]), shape[-1]) if shape else dense.reshape(1, 1)
    check_index_range(indices, numel, "dequant_scatter", ascending=True)
    if indices.numel() > 0:
        scatter_add(dense, indices, values.float())
    return dense.reshape(shape).to(out_dtype)
