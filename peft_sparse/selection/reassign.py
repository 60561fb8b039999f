"""What happens to values and optimizer state when a layer's index set changes during training.

Dynamic masks (SPEFT) and prune-and-regrow (SpIEL) rewrite a layer's ``indices`` with ``k`` fixed, so the values
parameter keeps its identity and shape (optimizers, DDP buckets and gradient clipping never see a new parameter).
:func:`reassign_entries` rewrites indices and values in place and remaps the optimizer state with the same rule:
an entry that stays selected keeps its value and its per-entry optimizer state (moved to its new position in the
sorted order); an entry that is new starts from zero value and zero state.

Per-entry state is every state tensor with the parameter's shape (Adam/AdamW ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``; SGD ``momentum_buffer``; :class:`peft_sparse.optim.SM3`'s ``momentum_buffer``). bitsandbytes'
8-bit optimizers (``AdamW8bit``, ``PagedAdamW8bit``, ...) keep blockwise-quantised moments (``state1``/``state2``
with ``absmax1``/``absmax2`` and ``qmap1``/``qmap2``): those are dequantised, remapped and re-quantised with the
same code map, so surviving moments move to within 8-bit rounding and new ones are zero to the map's resolution
(its smallest code: the unsigned map of the second moment has no exact zero). State that an
optimizer declares position-indexed (``optimizer.position_indexed_state``, e.g. SM3's row and column accumulators)
describes dense positions rather than entries and is left as it is. Scalar state such as Adam's ``step`` is shared
by all entries of the parameter and is left as it is: new entries then get the bias correction of the parameter's
step count, which for a zero second moment only scales their first updates. Any other state laid out differently
from the parameter raises ``NotImplementedError`` rather than being silently kept.

Under FSDP2 the values, their gradient and the moments are sharded ``DTensor``s: every rank gathers the whole
tensors, remaps them identically and writes its own chunk back in place (``peft_sparse._distributed``); 8-bit
moments of sharded values are refused.
"""

from __future__ import annotations

import torch

from .._distributed import is_sharded, whole, write_whole
from ..tuner.indices import check_indices, index_dtype

__all__ = ["move_entries", "reassign_entries", "surviving_positions", "unwrap_optimizer"]


def surviving_positions(old_indices: torch.Tensor, new_indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each new index: its position in ``old_indices`` and whether it was there at all (both sorted)."""
    old = old_indices.to(torch.int64)
    new = new_indices.to(device=old.device, dtype=torch.int64)
    if old.numel() == 0:
        return torch.zeros_like(new), torch.zeros(new.shape, dtype=torch.bool, device=new.device)
    positions = torch.searchsorted(old, new).clamp_(max=old.numel() - 1)
    return positions, old[positions] == new


def _remap(tensor: torch.Tensor, positions: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    remapped = torch.zeros_like(tensor)
    remapped[found] = tensor[positions[found]]
    return remapped


# bitsandbytes 8-bit optimizer state that belongs to a quantised moment (handled with it, never on its own).
_BNB_QUANTISED_KEYS = {"absmax1", "absmax2", "qmap1", "qmap2"}


def unwrap_optimizer(optimizer):
    """The optimizer holding the state (accelerate wraps the Trainer's in an AcceleratedOptimizer)."""
    while optimizer is not None and hasattr(optimizer, "optimizer"):
        inner = optimizer.optimizer
        if inner is optimizer or not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer = inner
    return optimizer


def _remap_blockwise_8bit(state: dict, key: str, positions: torch.Tensor, found: torch.Tensor) -> None:
    """Remap a bitsandbytes blockwise-quantised moment: dequantise, move entries, re-quantise with its code map."""
    import bitsandbytes.functional as bnb_functional

    which = key[-1]
    codes, absmax, code_map = state[key], state[f"absmax{which}"], state[f"qmap{which}"]
    blocksize = -(-codes.numel() // absmax.numel())
    blocksize = 1 << (blocksize - 1).bit_length()  # bitsandbytes' block sizes are powers of two
    dense = bnb_functional.dequantize_blockwise(codes, absmax=absmax, code=code_map, blocksize=blocksize)
    remapped = _remap(dense, positions, found)
    new_codes, new_state = bnb_functional.quantize_blockwise(remapped, code=code_map, blocksize=blocksize)
    codes.copy_(new_codes)
    absmax.copy_(new_state.absmax)


def reassign_entries(
    layer, adapter_name: str, new_indices: torch.Tensor, optimizer: torch.optim.Optimizer | None = None
) -> int:
    """Give ``layer``'s adapter a new index set of the same size, in place; return how many entries changed.

    Values and optimizer state of surviving entries follow them; new entries start at zero. The values parameter
    stays the same object, so an optimizer built on it remains valid.

    Args:
        layer: a :class:`~peft_sparse.tuner.layer.SparseLayer`.
        adapter_name: the adapter whose entries change.
        new_indices: sorted, unique flat positions, as many as the adapter has now.
        optimizer: the optimizer holding the values parameter, if any; its per-entry state is remapped.

    Raises:
        ValueError: if the new set is invalid or of a different size (checked before anything changes).
        NotImplementedError: if the optimizer keeps per-entry state in a layout other than the parameter's.
    """
    values = layer.sparse_values[adapter_name]
    old_indices = layer.sparse_indices[adapter_name]
    check_indices(new_indices, layer.num_weight_entries, f"{layer.layer_name}.sparse_indices.{adapter_name}")
    if new_indices.numel() != old_indices.numel():
        raise ValueError(
            f"reassign_entries: {layer.layer_name!r} has {old_indices.numel()} entries for adapter "
            f"{adapter_name!r}; got {new_indices.numel()} new indices (k must stay fixed)"
        )
    optimizer = unwrap_optimizer(optimizer)
    state = optimizer.state.get(values, {}) if optimizer is not None else {}
    skipped = set(getattr(optimizer, "position_indexed_state", ())) | _BNB_QUANTISED_KEYS
    quantised = [key for key in ("state1", "state2") if key in state and f"absmax{key[-1]}" in state]
    for key, tensor in state.items():
        if key in skipped or not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
            continue
        if tensor.shape != values.shape or (tensor.dtype == torch.uint8 and key not in quantised):
            raise NotImplementedError(
                f"reassign_entries: optimizer state {key!r} of shape {tuple(tensor.shape)} is not laid out per "
                f"entry like the values {tuple(values.shape)}; remapping it is not supported"
            )
    if quantised and is_sharded(values):
        raise NotImplementedError(
            f"reassign_entries: {layer.layer_name!r} has sharded (FSDP2) values and a blockwise 8-bit optimizer "
            f"state {quantised}; remapping quantised moments of a sharded parameter is not supported (use a 32-bit "
            "optimizer such as torch.optim.AdamW)"
        )
    positions, found = surviving_positions(old_indices, new_indices)
    with torch.no_grad():
        # Under FSDP2 values, their gradient and the moments are sharded: remap the whole tensors (identically on
        # every rank) and write each rank's chunk back in place.
        write_whole(values, _remap(whole(values), positions, found))
        if values.grad is not None:
            write_whole(values.grad, _remap(whole(values.grad), positions, found))
        for key, tensor in state.items():
            if key in skipped or key in quantised or not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
                continue
            write_whole(tensor, _remap(whole(tensor), positions, found))
        for key in quantised:
            _remap_blockwise_8bit(state, key, positions, found)
        old_indices.copy_(new_indices.to(device=old_indices.device, dtype=index_dtype(layer.num_weight_entries)))
    return int((~found).sum())


def move_entries(layer, adapter_name: str, new: torch.Tensor, optimizer) -> int:
    """Make ``new`` the trainable set: leaving deltas go to the residual, returning ones come back from it."""
    values = layer.sparse_values[adapter_name]
    old = layer.sparse_indices[adapter_name].to(torch.int64)
    new = new.to(device=old.device)
    _, stays = surviving_positions(new, old)  # for each old entry: is it still trainable?
    old_values = whole(values.detach())  # all entries, also where FSDP2 shards them
    leaving = ~stays & (old_values != 0)  # a zero delta carries nothing worth keeping
    leaving_indices, leaving_values = old[leaving], old_values[leaving].float()
    residual_indices = layer.sparse_residual_indices[adapter_name]
    residual_values = layer.sparse_residual_values[adapter_name]
    positions, returning = surviving_positions(residual_indices, new)  # for each new entry: in the residual?
    changed = reassign_entries(layer, adapter_name, new, optimizer)
    with torch.no_grad():
        new_values = whole(values.detach()).clone()
        new_values[returning] = residual_values[positions[returning]].to(values.dtype)
        write_whole(values, new_values)
    _, keep = surviving_positions(new, residual_indices)  # residual entries that stay residual
    keep = ~keep
    merged_indices = torch.cat([residual_indices[keep], leaving_indices])
    merged_values = torch.cat([residual_values[keep], leaving_values])
    order = torch.argsort(merged_indices)
    layer.sparse_residual_indices[adapter_name] = merged_indices[order]
    layer.sparse_residual_values[adapter_name] = merged_values[order]
    return changed
