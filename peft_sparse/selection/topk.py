"""Exact top-k over many layers' scores without concatenating them.

Scores are ranked by an order-preserving int32 image of their fp32 values (NaN lowest). The k-th largest is found
by a two-digit radix select (two histogram passes); entries above it are taken, and the remaining slots among
entries *equal* to it are filled deterministically: by seeded random priorities, then by layer order and position.
The result is exactly k entries, identical for a given seed on every machine.

:class:`RunningTopK` takes the layers one after another, holding a candidate set of at most about ``1.25 k``
entries (8 bytes each) between them instead of a score per weight of the whole model: that is what lets salience
selection run in bounded memory. :func:`select_top_k` is the same over a list of layers (one layer: the per-layer
budget, SpIEL's regrowth). :func:`reference_top_k` is the plain definition both are tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["RunningTopK", "reference_top_k", "select_top_k"]


def _ordered_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys with the order of the fp32 scores (NaN ranks lowest)."""
    values = torch.nan_to_num(scores.detach().reshape(-1).float(), nan=float("-inf"))
    bits = values.view(torch.int32).to(torch.int64)
    # Negative floats: flipping the magnitude bits reverses their order, making the map monotonic.
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


# Elements per slice when a layer's keys are made or filtered: bounds the temporaries to a few MiB whatever the layer.
_CHUNK = 1 << 22


def _ordered_keys_int32(scores: torch.Tensor, in_place: bool) -> torch.Tensor:
    """The keys of :func:`_ordered_keys` as int32 (the same numbers: the int64 keys are the sign-extended int32
    ones), flat. ``in_place``: overwrite ``scores`` (a contiguous fp32 tensor the caller gives up) instead of
    allocating 4 bytes per entry."""
    flat = scores.detach().reshape(-1)
    if not (in_place and flat.dtype == torch.float32 and flat.is_contiguous()):
        flat = flat.float().clone()
    bits = flat.view(torch.int32)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK]
        torch.nan_to_num_(chunk, nan=float("-inf"))
        chunk_bits = bits[start : start + _CHUNK]
        chunk_bits ^= (chunk_bits >> 31) & 0x7FFFFFFF  # negative floats: flip the magnitude bits
    return bits


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


def _radix_histogram(keys: Sequence[torch.Tensor], high_part: int | None) -> torch.Tensor:
    """Counts of the int32 keys' upper 16 bits (``high_part=None``) or, among keys whose upper 16 bits are
    ``high_part``, of their lower 16 bits; 65536 bins, ascending."""
    counts = None
    for key in keys:
        for start in range(0, key.numel(), _CHUNK):
            chunk = key[start : start + _CHUNK]
            if high_part is None:
                digits = (chunk >> 16) + 32768
            else:
                digits = chunk[(chunk >> 16) == high_part] & 0xFFFF
            histogram = torch.bincount(digits, minlength=65536)
            counts = histogram if counts is None else counts + histogram
    return counts


def _kth_largest_int32(keys: Sequence[torch.Tensor], k: int) -> int:
    """:func:`_kth_largest` for int32 keys by a two-digit radix select: two histogram passes over the keys
    instead of 32 counting passes (the k-th largest value is one number, so the result is the same)."""
    upper, k = _digit_of_kth_largest(_radix_histogram(keys, None), k)
    upper -= 32768  # the histogram's bins are the upper 16 bits shifted to be non-negative
    lower, _ = _digit_of_kth_largest(_radix_histogram(keys, upper), k)
    return (upper << 16) | lower


def _digit_of_kth_largest(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest of a 65536-bin histogram, and that entry's rank within the bin."""
    at_or_above = counts.flip(0).cumsum(0)  # entry j: how many entries fall in bins >= 65535 - j
    j = int(torch.searchsorted(at_or_above, k))
    return 65535 - j, k - (int(at_or_above[j - 1]) if j else 0)


def select_top_k(
    scores: Sequence[torch.Tensor], k: int, generators: Sequence[torch.Generator], *, in_place: bool = False
) -> list[torch.Tensor]:
    """Indices of the ``k`` highest scores over all layers, as one sorted int64 tensor of flat positions per layer.

    Ties at the k-th largest score are broken by seeded random priorities (layer ``l``'s j-th tied entry, in position
    order, gets the j-th draw of ``generators[l]``), then by layer and position: the result is the same on every
    machine. Computed by :class:`RunningTopK` (a radix select on int32 images of the scores, 4 bytes per entry of the
    largest layer plus about ``1.25 k`` candidates of 8 bytes); on one layer it costs about what ``torch.topk``
    does, or less (``benchmarks/ops_bench.py``).

    Args:
        scores: one score tensor per layer (any shape; flattened row-major).
        k: how many entries to select in total, ``0 <= k <= sum of numels``.
        generators: one seeded generator per layer, drawn from only to break ties (not advanced).
        in_place: let the selection overwrite each contiguous fp32 score tensor with its keys instead of copying it.
    """
    total = sum(s.numel() for s in scores)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= total:
        raise ValueError(f"select_top_k: k={k!r} must be an int in [0, {total}]")
    if len(generators) != len(scores):
        raise ValueError(f"select_top_k: {len(scores)} score tensors but {len(generators)} generators")
    running = RunningTopK(k, generators)
    for layer in scores:
        running.add(layer, in_place=in_place)
    return running.result()


def reference_top_k(
    scores: Sequence[torch.Tensor], k: int, generators: Sequence[torch.Generator]
) -> list[torch.Tensor]:
    """The plain definition of :func:`select_top_k`, which the fast paths are tested against: every layer's int64
    keys at once (8 bytes per entry), the threshold by 32 counting passes. Same arguments and result."""
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


class RunningTopK:
    """:func:`select_top_k` over layers that arrive one at a time, holding O(k) entries between them.

    ``add`` each layer's scores in layer order, then call :meth:`result`: the entries are exactly those
    ``select_top_k(all_scores, k, generators)`` returns, tie-breaks included, but no score of an earlier layer is
    kept, only a candidate set: every entry that can still be among the k chosen, as (int32 key, position) pairs of
    4 + 4 bytes (8 + 4 where a layer has 2**31 entries or more).

    Why this is exact: the k-th largest key over the layers seen so far, ``b``, can only rise as layers arrive, so an
    entry below it is never chosen and is dropped. Entries equal to it may still be chosen if ``b`` ends as the final
    threshold; :func:`select_top_k` then ranks them by seeded priorities (layer ``l``'s j-th tie in position order
    gets the j-th draw of its generator), then by layer and position. A layer's entries at ``b`` all entered the set
    together (all were at least the boundary when their layer arrived), so their tie ranks are their order in the
    set, and the priorities can be drawn whenever needed. When there are more ties at ``b`` than free slots, only the
    best ``slots`` of them (that order) are kept, with their priorities: later layers can only take slots away, so
    a dropped tie could never win.

    Memory: at most ``k + max(k // 4, 1)`` candidates plus the entries of the arriving layer that reach the
    boundary (the set is pruned back to at most ``k`` whenever it outgrows that), plus per layer a few MiB of
    temporaries; :attr:`peak_bytes` is the largest the set has been.

    Args:
        k: how many entries to choose in total (``0 <= k <=`` the total added, checked in :meth:`result`).
        generators: one seeded generator per layer, as for :func:`select_top_k`; only their state at construction
            is used (they are not advanced).
    """

    def __init__(self, k: int, generators: Sequence[torch.Generator]) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"RunningTopK: k must be a non-negative int, got {k!r}")
        self.k = k
        self._generator_states = [g.get_state() for g in generators]
        self._keys: list[torch.Tensor] = []  # per layer: int32 keys of its candidates, in position order
        self._positions: list[torch.Tensor] = []  # per layer: their flat positions, ascending
        self._sizes: list[int] = []
        self._boundary: int | None = None  # every entry that can still be chosen has a key >= this
        self._trimmed: dict[int, torch.Tensor] = {}  # layer -> priorities of its kept entries at the boundary
        self._trimmed_at: int | None = None  # the key those priorities belong to
        self.peak_bytes = 0

    @property
    def held(self) -> int:
        return sum(k.numel() for k in self._keys)

    @property
    def nbytes(self) -> int:
        tensors = [*self._keys, *self._positions, *self._trimmed.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def add(self, scores: torch.Tensor, *, in_place: bool = False) -> None:
        """Add the next layer's scores (any shape, flattened row-major). ``in_place=True`` lets the set turn a
        contiguous fp32 ``scores`` into its keys instead of copying it (the caller must not use it afterwards)."""
        layer = len(self._sizes)
        if layer >= len(self._generator_states):
            raise ValueError(f"RunningTopK: more layers added than the {len(self._generator_states)} generators")
        size = scores.numel()
        self._sizes.append(size)
        if self.k == 0 or size == 0:
            self._keys.append(torch.empty(0, dtype=torch.int32, device=scores.device))
            self._positions.append(torch.empty(0, dtype=torch.int64, device=scores.device))
            return
        keys = _ordered_keys_int32(scores, in_place)
        floor = self._boundary
        if size > self.k and (floor is None or int((keys >= floor).sum()) > self.k):
            # Entries below this layer's own k-th largest key have k larger ones in this layer alone.
            own = _kth_largest_int32([keys], self.k)
            floor = own if floor is None else max(floor, own)
        position_dtype = torch.int32 if size < 2**31 else torch.int64
        kept_keys, kept_positions = [], []
        for start in range(0, size, _CHUNK):
            chunk = keys[start : start + _CHUNK]
            where = torch.nonzero(chunk >= floor).flatten() if floor is not None else None
            if where is None:
                kept_keys.append(chunk)
                kept_positions.append(
                    torch.arange(start, start + chunk.numel(), device=keys.device, dtype=position_dtype)
                )
            else:
                kept_keys.append(chunk[where])
                kept_positions.append((where + start).to(position_dtype))
        del keys
        self._keys.append(torch.cat(kept_keys))
        self._positions.append(torch.cat(kept_positions))
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        if self.held > self.k + max(self.k // 4, 1) or (self._boundary is None and self.held > self.k):
            self._prune()

    def _fresh_generator(self, layer: int) -> torch.Generator:
        generator = torch.Generator()
        generator.set_state(self._generator_states[layer])
        return generator

    def _prune(self) -> None:
        """Drop every entry that can no longer be chosen; afterwards at most k remain."""
        if self.held <= self.k:
            return
        boundary = _kth_largest_int32(self._keys, self.k)
        if self._trimmed_at is not None and self._trimmed_at != boundary:
            self._trimmed, self._trimmed_at = {}, None
        above = 0
        for layer, keys in enumerate(self._keys):
            if keys.numel() and int(keys.min()) < boundary:
                keep = keys >= boundary
                self._keys[layer], self._positions[layer] = keys[keep], self._positions[layer][keep]
            above += int((self._keys[layer] > boundary).sum())
        self._boundary = boundary
        slots = self.k - above
        tied = [torch.nonzero(keys == boundary).flatten() for keys in self._keys]
        if sum(t.numel() for t in tied) <= slots:
            return
        # More ties than slots: keep the best `slots` of them by (priority desc, layer, position).
        priorities = []
        for layer, where in enumerate(tied):
            if layer in self._trimmed:
                priorities.append(self._trimmed[layer])
            else:  # this layer's ties are all here, in position order: its first draws, in order
                draws = torch.randint(0, 2**62, (where.numel(),), generator=self._fresh_generator(layer))
                priorities.append(draws.to(where.device))
        order = torch.sort(torch.cat(priorities), descending=True, stable=True).indices
        winners = torch.zeros(order.numel(), dtype=torch.bool, device=order.device)
        winners[order[:slots]] = True
        self._trimmed, self._trimmed_at, start = {}, boundary, 0
        for layer, (where, priority) in enumerate(zip(tied, priorities)):
            won = winners[start : start + where.numel()]
            start += where.numel()
            if not where.numel():
                continue
            keep = torch.ones(self._keys[layer].numel(), dtype=torch.bool, device=won.device)
            keep[where[~won]] = False
            self._keys[layer], self._positions[layer] = self._keys[layer][keep], self._positions[layer][keep]
            self._trimmed[layer] = priority[won]

    def result(self) -> list[torch.Tensor]:
        """The chosen flat positions of every layer added, each a sorted int64 tensor; exactly k in total."""
        if len(self._sizes) != len(self._generator_states):
            raise ValueError(
                f"RunningTopK: {len(self._sizes)} layers added, {len(self._generator_states)} generators given"
            )
        total = sum(self._sizes)
        if self.k > total:
            raise ValueError(f"select_top_k: k={self.k} must lie in [0, {total}]")
        self._prune()
        return [positions.to(torch.int64) for positions in self._positions]
