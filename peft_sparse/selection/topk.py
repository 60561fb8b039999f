"""Exact top-k over many layers' scores without concatenating them.

The k-th largest score is found by bisection on an order-preserving integer image of the fp32 scores (32 counting
passes over the layers, no concatenated copy, no sort of everything). Entries above it are taken; the remaining
slots among entries *equal* to it are filled deterministically: by seeded random priorities (another bisection),
then by layer order and position. The result is exactly k entries, identical for a given seed on every machine.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["select_top_k"]


def _ordered_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys with the order of the fp32 scores (NaN ranks lowest)."""
    values = torch.nan_to_num(scores.detach().reshape(-1).float(), nan=float("-inf"))
    bits = values.view(torch.int32).to(torch.int64)
    # Negative floats: flipping the magnitude bits reverses their order, making the map monotonic.
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _kth_largest(keys: Sequence[torch.Tensor], k: int) -> int:
    """The largest t with #{key >= t} >= k (1 <= k <= total count)."""
    low = min(int(key.min()) for key in keys if key.numel())
    high = max(int(key.max()) for key in keys if key.numel())
    while low < high:
        middle = (low + high + 1) // 2
        if sum(int((key >= middle).sum()) for key in keys) >= k:
            low = middle
        else:
            high = middle - 1
    return low


def select_top_k(scores: Sequence[torch.Tensor], k: int, generators: Sequence[torch.Generator]) -> list[torch.Tensor]:
    """Indices of the ``k`` highest scores over all layers, as one sorted int64 tensor of flat positions per layer.

    Args:
        scores: one score tensor per layer (any shape; flattened row-major).
        k: how many entries to select in total, ``0 <= k <= sum of numels``.
        generators: one seeded generator per layer, drawn from only to break ties.
    """
    total = sum(s.numel() for s in scores)
    if not 0 <= k <= total:
        raise ValueError(f"select_top_k: k={k} must lie in [0, {total}]")
    devices = [s.device for s in scores]
    if k == 0:
        return [torch.empty(0, dtype=torch.int64, device=d) for d in devices]
    keys = [_ordered_keys(s) for s in scores]
    threshold = _kth_largest(keys, k)
    chosen = [torch.nonzero(key > threshold).flatten() for key in keys]
    remaining = k - sum(c.numel() for c in chosen)
    if remaining > 0:
        ties = [torch.nonzero(key == threshold).flatten() for key in keys]
        priorities = [
            torch.randint(0, 2**62, (t.numel(),), generator=g).to(t.device) for t, g in zip(ties, generators)
        ]
        cut = _kth_largest(priorities, remaining)
        for layer, (tie, priority) in enumerate(zip(ties, priorities)):
            above = tie[priority > cut]
            chosen[layer] = torch.cat([chosen[layer], above])
            remaining -= above.numel()
        for layer, (tie, priority) in enumerate(zip(ties, priorities)):  # equal priorities: layer order, position
            if remaining == 0:
                break
            at_cut = tie[priority == cut][:remaining]
            chosen[layer] = torch.cat([chosen[layer], at_cut])
            remaining -= at_cut.numel()
    return [c.sort().values for c in chosen]
