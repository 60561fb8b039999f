"""``select_mask``: choose every sparse layer's trainable entries by salience (SPEFT, Algorithm 1, t = 1)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._distributed import is_sharded, whole
from ..tuner.budget import allocate_budget
from ..tuner.config import SparseConfig
from ..tuner.indices import layer_seed
from ..tuner.layer import SparseLayer
from ..tuner.lookup import resolve_adapter, sparse_layers
from .passes import compute_scores
from .reassign import move_entries, reassign_entries
from .salience import METRICS
from .topk import select_top_k

__all__ = ["SelectionReport", "salience_scores", "select_mask", "update_mask"]


@dataclass
class SelectionReport:
    """What :func:`select_mask` did."""

    selection: str
    budget: str
    num_batches: int
    per_layer: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    extra_memory_bytes: int = 0  # peak bytes of gradient accumulators and scores held at once

    @property
    def total(self) -> int:
        return sum(self.per_layer.values())


def select_mask(
    model: nn.Module,
    data: Iterable | None = None,
    *,
    num_batches: int | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    adapter_name: str | None = None,
    accumulation_dtype: torch.dtype = torch.float32,
    layers_per_pass: int | None = None,
    keep_layer_sizes: bool = False,
    reset_values: bool = False,
) -> SelectionReport:
    """Choose the trainable entries of every sparse layer of an adapter by the salience metric of its config.

    Computes the per-entry salience of every targeted weight over ``num_batches`` batches of ``data`` (see
    :mod:`peft_sparse.selection.salience` for the metrics), picks the top-k (``budget="global"``: one exact top-k
    over all targeted weights, ``"local"``: the same density in each layer), writes the new sorted indices into
    every sparse layer and resets their values to zero. Call it before building the optimizer (the values
    parameters are replaced by new ones of the selected sizes).

    Args:
        model: a ``PeftModel`` (or ``SparseModel``) with a sparse adapter.
        data: an iterable of batches (dicts of tensors accepted by the model, with labels unless ``loss_fn`` is
            given). Not needed for ``magnitude`` and ``random``.
        num_batches: how many batches to use; defaults to ``config.salience_batches``.
        loss_fn: ``loss_fn(outputs, batch) -> loss``; defaults to ``outputs.loss``.
        adapter_name: the adapter to select for; defaults to the active one.
        accumulation_dtype: dtype of the dense gradient accumulators. fp32 (default) costs 4 bytes per targeted
            weight (8 for ``fisher``, whose per-batch squares need a second buffer); the model's compute dtype
            halves that, at the cost of rounding in long sums.
        layers_per_pass: estimate salience for this many layers at a time, re-reading the batches for each group:
            the accumulators then never hold more than that many layers (at the cost of one pass over the data
            per group). ``None``: all layers in one pass.
        keep_layer_sizes: keep every layer's current ``k`` and rewrite its indices in place (the values
            ``Parameter`` objects survive, so an optimizer or a DDP wrapper built on them stays valid; values are
            still reset to zero). The budget is then the one allocated at injection; ``global`` no longer moves
            entries between layers.
        reset_values: selection sets every value to zero, so it refuses an adapter that holds values other than
            its initial ones (trained, loaded or set by hand), which would be lost; ``True`` discards them
            deliberately.

    The values ``Parameter`` objects keep their identity (they are resized in place), so an optimizer built
    before ``select_mask`` and not stepped yet trains the selected entries.

    Under ``torch.distributed`` the gradient accumulators are summed over ranks before scoring, so every rank
    selects the same entries from the salience of the global batch. On a model wrapped with FSDP2 the values
    cannot be resized: ``keep_layer_sizes=True`` is required there (refused otherwise).

    Returns:
        A :class:`SelectionReport` (per-layer k, time taken, peak extra memory).
    """
    start = time.perf_counter()
    _, adapter_name, config, metric, layers = _prepare("select_mask", model, adapter_name, data)
    if not keep_layer_sizes and any(is_sharded(layer.sparse_values[adapter_name]) for _, layer in layers):
        raise ValueError(
            "select_mask: the values are sharded by FSDP2, whose shards are laid out for each layer's current k, so "
            "the budget cannot move between layers now; pass keep_layer_sizes=True, or select before wrapping the "
            "model (before trainer.train() with a Trainer)"
        )
    with_residual = [name for name, layer in layers if layer.sparse_residual_indices[adapter_name].numel()]
    if with_residual:
        raise ValueError(
            f"select_mask: layers {with_residual[:3]} hold deltas moved out by dynamic updates; a fresh mask would "
            "drop or double-count them. Use update_mask during training."
        )
    trained = [name for name, layer in layers if _holds_trained_values(layer, adapter_name, config)]
    if trained and not reset_values:
        raise ValueError(
            f"select_mask: adapter {adapter_name!r} holds trained values in {len(trained)} layer(s) (e.g. "
            f"{trained[:3]}); selecting a mask resets every value to zero and would lose them. Select before "
            "training, or pass reset_values=True to discard them."
        )
    scores, batches_seen, peak = compute_scores(
        model, layers, adapter_name, config, metric, data, num_batches, loss_fn, accumulation_dtype, layers_per_pass
    )
    ties = tie_generators(config, layers)
    if keep_layer_sizes:
        counts = [layer.sparse_indices[adapter_name].numel() for _, layer in layers]
    else:
        counts = allocate_budget(
            [layer.num_weight_entries for _, layer in layers],
            config.density,
            config.num_tunable_weights,
            config.budget,
        )
    if config.budget == "global" and not keep_layer_sizes:
        chosen = select_top_k(scores, sum(counts), ties)
    else:
        chosen = [select_top_k([s], c, [g])[0] for s, c, g in zip(scores, counts, ties)]
    report = SelectionReport(config.selection, "per-layer k kept" if keep_layer_sizes else config.budget, batches_seen)
    for (name, layer), indices in zip(layers, chosen):
        if keep_layer_sizes:
            with torch.no_grad():
                layer.sparse_values[adapter_name].zero_()
            reassign_entries(layer, adapter_name, indices)
        else:
            layer.set_sparse_entries(adapter_name, indices)
        layer.mask_chosen.add(adapter_name)
        report.per_layer[name] = indices.numel()
    report.seconds = time.perf_counter() - start
    report.extra_memory_bytes = peak
    return report


def salience_scores(
    model: nn.Module,
    data: Iterable | None = None,
    *,
    num_batches: int | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    adapter_name: str | None = None,
    accumulation_dtype: torch.dtype = torch.float32,
    layers_per_pass: int | None = None,
) -> dict[str, torch.Tensor]:
    """The salience :func:`select_mask` would rank, without selecting: for every sparse layer of the adapter (by
    module name) an fp32 score per entry of its ``(out, in)`` weight, by the metric of the adapter's config.
    Nothing in the model changes. Arguments as for :func:`select_mask`; :func:`tie_generators` gives the seeded
    tie-breaks that make a top-k of these scores the mask ``select_mask`` picks."""
    _, adapter_name, config, metric, layers = _prepare("salience_scores", model, adapter_name, data)
    scores, _, _ = compute_scores(
        model, layers, adapter_name, config, metric, data, num_batches, loss_fn, accumulation_dtype, layers_per_pass
    )
    return {name: score for (name, _), score in zip(layers, scores)}


def update_mask(
    model: nn.Module,
    data: Iterable | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    num_batches: int | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    adapter_name: str | None = None,
    accumulation_dtype: torch.dtype = torch.float32,
    layers_per_pass: int | None = None,
) -> SelectionReport:
    """One dynamic mask update (SPEFT, ``update="dynamic"``): re-rank every layer's entries and move its ``k``.

    Salience is recomputed on the weights the model computes with (base plus the adapter's whole delta, so the
    deltas trained so far are folded in), and each layer keeps its current ``k``: its top-``k`` entries become the
    trainable set. Nothing learned is lost and the model's function does not change: an entry that leaves the
    trainable set keeps its delta in the layer's *residual* (``sparse_residual_indices/values``: used by the
    forward, merges and ``save_pretrained``, no longer trained; for a quantised base this is also what avoids
    re-quantising), and an entry that returns from the residual resumes from its delta. Indices are rewritten in
    place with :func:`~peft_sparse.selection.reassign.reassign_entries`, so the values parameters and the optimizer
    stay valid; the optimizer state of entries that changed is reset to zero, that of the others is kept.

    Args:
        model, data, num_batches, loss_fn, adapter_name, accumulation_dtype, layers_per_pass: as for
            :func:`select_mask`.
        optimizer: the optimizer training the values, whose per-entry state is remapped.

    Returns:
        A :class:`SelectionReport` whose ``per_layer`` counts the entries that changed in each layer.
    """
    start = time.perf_counter()
    _, adapter_name, config, metric, layers = _prepare("update_mask", model, adapter_name, data)
    scores, batches_seen, peak = compute_scores(
        model, layers, adapter_name, config, metric, data, num_batches, loss_fn, accumulation_dtype, layers_per_pass
    )
    report = SelectionReport(config.selection, "per-layer k kept", batches_seen)
    for (name, layer), score, generator in zip(layers, scores, tie_generators(config, layers)):
        new = select_top_k([score], layer.sparse_indices[adapter_name].numel(), [generator])[0]
        report.per_layer[name] = move_entries(layer, adapter_name, new, optimizer)
        layer.mask_chosen.add(adapter_name)
    report.seconds = time.perf_counter() - start
    report.extra_memory_bytes = peak
    return report


def _holds_trained_values(layer: SparseLayer, adapter_name: str, config: SparseConfig) -> bool:
    """Whether the adapter's values in ``layer`` are anything but the ones it was created with (zeros, or the
    seeded ``init_weights=False`` draws, recomputed to compare)."""
    values = whole(layer.sparse_values[adapter_name].detach())
    if not bool(values.any()):
        return False
    if config.init_weights or adapter_name in layer.mask_chosen:
        return True
    indices, initial = layer.initial_entries(values.numel(), config.seed, init_weights=False)
    return not (
        torch.equal(layer.sparse_indices[adapter_name].cpu().to(torch.int64), indices)
        and torch.equal(values.cpu(), initial.to(values.dtype))
    )


def _prepare(caller: str, model, adapter_name, data):
    root, adapter_name, config = resolve_adapter(model, adapter_name, caller)
    metric = METRICS[config.selection]
    layers = sparse_layers(root, adapter_name)
    if not layers:
        raise ValueError(f"{caller}: no sparse layer holds adapter {adapter_name!r}")
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"{caller}: layers {merged[:3]} are merged; unmerge the adapter before selecting")
    if metric.needs_data and data is None:
        raise ValueError(
            f"{caller}: SparseConfig.selection={config.selection!r} needs `data` (batches of training data)"
        )
    return root, adapter_name, config, metric, layers


def tie_generators(config: SparseConfig, layers: list[tuple[str, SparseLayer]]) -> list[torch.Generator]:
    """The seeded generators that break ties between equal scores, one per ``(name, layer)``: the same for every
    selection of one config, so equal salience gives the same mask on every run and every rank."""
    return [torch.Generator().manual_seed(layer_seed(config.seed + 1, name)) for name, _ in layers]
