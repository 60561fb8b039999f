"""Index-set helpers shared by the sparse layers: dtype choice, validation and seeded random sets.

An index set addresses a logical ``(out, in)`` weight by row-major flat position ``row * in + col``. It is always
1-D, sorted, unique and in range; its dtype is int32 when ``out * in < 2**31`` and int64 otherwise.
"""

from __future__ import annotations

import zlib

import torch

INT32_LIMIT = 2**31


def index_dtype(numel: int) -> torch.dtype:
    """The dtype an index set into a weight of ``numel`` entries is stored in."""
    return torch.int32 if numel < INT32_LIMIT else torch.int64


def layer_seed(seed: int, layer_name: str) -> int:
    """A per-layer seed that depends only on the config seed and the layer's name (not on creation order)."""
    return (seed * 1_000_003 + zlib.crc32(layer_name.encode("utf-8"))) % (2**63 - 1)


def random_indices(numel: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Draw ``k`` distinct positions out of ``numel``, uniformly, as a sorted int64 tensor.

    Memory is O(k) for sparse draws (rejection of duplicates), so a 7B-model layer never needs a ``numel``-long
    permutation; dense draws (``k`` above a quarter of ``numel``) use ``randperm``.
    """
    if not 0 <= k <= numel:
        raise ValueError(f"cannot draw k={k} distinct indices out of {numel}")
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    if 4 * k >= numel:
        return torch.randperm(numel, generator=generator)[:k].sort().values
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < k:
        # Over-draw a little so that one round usually suffices despite collisions.
        draw = torch.randint(0, numel, (k - chosen.numel() + k // 16 + 16,), generator=generator)
        chosen = torch.unique(torch.cat([chosen, draw]))
    # unique() sorts, which biases a plain prefix towards small positions; pick a uniform subset instead.
    keep = torch.randperm(chosen.numel(), generator=generator)[:k]
    return chosen[keep].sort().values


def check_indices(indices: torch.Tensor, numel: int, where: str) -> None:
    """Raise ``ValueError`` unless ``indices`` is a valid index set into ``numel`` positions.

    ``where`` names the tensor in the message (e.g. ``"model.layers.0.q_proj.sparse_indices.default"``).
    """
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{where}: expected a tensor of indices, got {type(indices).__name__}")
    if indices.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"{where}: indices must have an integer dtype, got {indices.dtype}")
    if indices.dim() != 1:
        raise ValueError(f"{where}: indices must be 1-D, got shape {tuple(indices.shape)}")
    if indices.numel() == 0:
        return
    if indices.device.type == "meta":
        return
    flat = indices.to(torch.int64)
    low, high = int(flat.min()), int(flat.max())
    if low < 0 or high >= numel:
        raise ValueError(f"{where}: indices must lie in [0, {numel}), got values in [{low}, {high}]")
    if indices.numel() > 1 and not bool((flat[1:] > flat[:-1]).all()):
        raise ValueError(f"{where}: indices must be sorted and unique")
