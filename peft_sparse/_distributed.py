"""Where this process stands in ``torch.distributed`` (a single process when it is not initialised), and the two
moves every entry-rewriting code path needs under FSDP2: read a sharded tensor whole, write a whole tensor back
into its shard.

Under FSDP2 (``fully_shard``) a parameter outside forward/backward is a ``DTensor`` holding this rank's chunk of
dim 0, and so is every optimizer state created ``zeros_like`` it (AdamW's moments). peft-sparse's values are 1-D
(one per entry), so a rank holds a contiguous run of entries. Prune/regrow and dynamic updates reason about a whole
layer's entries at once: they read the whole tensor (one all-gather, O(k)), compute the new whole tensor exactly as
on one process (every rank computes the same thing), and each rank copies its own chunk back in place, so the
``Parameter`` and state objects the optimizer and FSDP hold are never replaced. Plain tensors pass through.
"""

from __future__ import annotations

import torch


def _initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if _initialised() else 1


def rank() -> int:
    return torch.distributed.get_rank() if _initialised() else 0


def _dtensor_type():
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (e.g. an FSDP2-sharded parameter or its optimizer state)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole (global) tensor as a plain local tensor: all-gathered if sharded (a collective: every rank must
    call it, in the same order), else ``tensor`` itself."""
    if is_sharded(tensor):
        return tensor.full_tensor()
    return tensor


def write_whole(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the whole tensor ``value`` into ``target`` in place; for a sharded ``target``, only this rank's chunk
    (no communication: every rank holds the same ``value``)."""
    if not is_sharded(target):
        target.copy_(value)
        return
    target.to_local().copy_(local_part(target, value))


def local_part(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The part of the whole tensor ``value`` that this rank holds of ``target`` (a view; ``value`` itself when
    ``target`` is not sharded)."""
    if not is_sharded(target):
        return value
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
    for dim, (start, length) in enumerate(zip(offset, shape)):
        value = value.narrow(dim, start, length)
    return value
