"""``select_mask``: choose every sparse layer's trainable entries by salience (SPEFT, Algorithm 1, t = 1)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._distributed import is_sharded, whole, world_size
from .._memory import free_memory_bytes
from ..tuner.budget import allocate_budget
from ..tuner.config import SparseConfig
from ..tuner.indices import index_dtype, layer_seed
from ..tuner.layer import SparseLayer
from ..tuner.lookup import resolve_adapter, sparse_layers
from .passes import (
    MIN_REPLAYED_GROUPS,
    layer_scores,
    one_pass_budget,
    pass_memory_bytes,
    plan_groups,
    salience_batches,
    smallest_budget,
)
from .reassign import move_entries, reassign_entries
from .replay import group_blocks, replay_passes
from .salience import METRICS
from .topk import RunningTopK, select_top_k

__all__ = ["SelectionReport", "salience_scores", "select_mask", "update_mask"]

logger = logging.getLogger(__name__)


@dataclass
class SelectionReport:
    """What :func:`select_mask` did."""

    selection: str
    budget: str
    num_batches: int
    per_layer: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    extra_memory_bytes: int = 0  # peak bytes held at once: accumulators, one layer's scoring, the candidate set
    passes: int = 0  # passes over the data (one per layer group, plus a recording one where replayed; GRaSP two)
    max_memory: int | None = None  # the budget the layer groups were planned under (None: layers_per_pass alone)
    replayed: bool = False  # the layer groups were scored by decoder-block replay (see selection.replay)
    # the block boundaries replay recorded (the largest round): host memory, outside max_memory and
    # extra_memory_bytes
    replay_bytes: int = 0
    # replay's recording passes: one, or a round each where host memory held only some groups' boundaries at a time
    replay_recordings: int = 0
    # where memory was tight and the budget came from it: a salience batch's forward and backward, measured on one
    # more batch before the passes (None: not measured)
    pass_memory_bytes: int | None = None
    # where replayed: the decoder blocks the groups' replays ran per batch (a block split between groups once for
    # each group) and the blocks of the model; their ratio is the replays' cost in whole passes
    replayed_blocks: int = 0
    decoder_blocks: int = 0

    @property
    def total(self) -> int:
        return sum(self.per_layer.values())

    @property
    def forward_backward_passes(self) -> int:
        """Whole-model forward and backward passes over a salience batch: ``passes x num_batches``, or where the
        groups were replayed ``recordings x num_batches`` plus the replays' blocks in whole passes (``replayed_blocks
        / decoder_blocks`` per batch, rounded up: one pass where no block is split between groups, more where
        groups split blocks and each replays the shared ones), and one more where memory was tight and a batch's
        forward and backward were measured first: selection's cost in training-step equivalents, when the salience
        batches are the size of a training batch."""
        probed = self.pass_memory_bytes is not None
        if not self.replayed:
            return self.passes * self.num_batches + probed
        replays = replay_passes(self.replayed_blocks, self.decoder_blocks, self.num_batches)
        return self.replay_recordings * self.num_batches + replays + probed

    def log_entries(self, prefix: str) -> dict[str, float]:
        """What the training callback logs of this selection or update, under ``prefix`` (``"selection"`` or
        ``"update"``): wall time, passes, batches and forward+backward passes."""
        return {
            f"sparse/{prefix}_seconds": self.seconds,
            f"sparse/{prefix}_passes": float(self.passes),
            f"sparse/{prefix}_batches": float(self.num_batches),
            f"sparse/{prefix}_forward_backward": float(self.forward_backward_passes),
        }


def select_mask(
    model: nn.Module,
    data: Iterable | None = None,
    *,
    num_batches: int | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    adapter_name: str | None = None,
    accumulation_dtype: torch.dtype | None = None,
    layers_per_pass: int | None = None,
    keep_layer_sizes: bool = False,
    reset_values: bool = False,
    max_memory: int | None = None,
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
        accumulation_dtype: dtype of the dense gradient accumulators; ``None``: the config's
            ``selection_accumulation_dtype`` (float32 by default). fp32 costs 4 bytes per targeted weight (12 for
            ``fisher``: the sum of squares and the batch buffer besides the sum); bf16 halves that, at the cost of
            rounding in the sums.
        layers_per_pass: at most this many layers share one pass over the data (``None``: as many as
            ``max_memory`` allows).
        keep_layer_sizes: keep every layer's current ``k`` and rewrite its indices in place (the values
            ``Parameter`` objects survive, so an optimizer or a DDP wrapper built on them stays valid; values are
            still reset to zero). The budget is then the one allocated at injection; ``global`` no longer moves
            entries between layers.
        reset_values: selection sets every value to zero, so it refuses an adapter that holds values other than
            its initial ones (trained, loaded or set by hand), which would be lost; ``True`` discards them
            deliberately.
        max_memory: bytes that selection may hold beyond the model and one pass's activations (``None``: the
            config's ``selection_max_memory``, whose default ``None`` means :func:`default_max_memory`: the
            candidates plus 12 bytes per entry, at least 64 MiB). Salience needs a dense accumulator per weight (4 bytes in fp32) that must
            outlive every batch, so the layers are split into groups that fit the budget, each scored in its own
            pass over the same batches (drawn once from ``data``); the global top-k is kept as a running candidate
            set of about ``k`` entries (:class:`~peft_sparse.selection.topk.RunningTopK`), never a score per
            weight of the whole model. The mask is the same whatever the budget; a smaller budget costs passes.
            A budget too small for the largest layer is refused, naming the smallest workable value.

    The values ``Parameter`` objects keep their identity (they are resized in place), so an optimizer built
    before ``select_mask`` and not stepped yet trains the selected entries.

    Under ``torch.distributed`` the gradient accumulators are summed over ranks before scoring, so every rank
    selects the same entries from the salience of the global batch. On a model wrapped with FSDP2 the values
    cannot be resized: ``keep_layer_sizes=True`` is required there (refused otherwise).

    Returns:
        A :class:`SelectionReport` (per-layer k, time taken, peak extra memory, passes over the data).
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
    one_top_k = config.budget == "global" and not keep_layer_sizes
    report = SelectionReport(config.selection, "per-layer k kept" if keep_layer_sizes else config.budget, 0)
    passes = _Passes(data, num_batches, loss_fn, accumulation_dtype, layers_per_pass, max_memory)
    chosen = _choose(
        "select_mask", model, layers, adapter_name, config, metric, passes, counts, ties, one_top_k, report
    )
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
    return report


# Bytes per entry of k planned for the running top-k: at most 1.25 k candidates between layers, 8 bytes each (int32
# key and position), and an arriving layer's entries that reach the boundary before the set is pruned back (rarely
# more than 0.25 k once the set is full). The report's extra_memory_bytes counts what it really held.
CANDIDATE_BYTES_PER_ENTRY = 12
# What a training step adds per entry over what exists at selection time (the values and indices already do): the
# fp32 gradient and two AdamW moments. The default budget gives the accumulators at least that much.
TRAINING_STATE_BYTES_PER_ENTRY = 12
# ... and never less than this: below it memory limits no one, while every extra group costs a pass over the salience
# batches.
MIN_DEFAULT_ACCUMULATOR_BYTES = 64 * 2**20
# Of the memory the device has free when selection starts, the share the default budget may take for one pass: the
# rest stays for the salience passes' own forward and backward (about a training step's activations), the allocator's
# slack and whatever else runs.
FREE_MEMORY_SHARE = 0.5
# Where one pass does not fit that share, the budget is what is free less a salience batch's measured forward and
# backward (:func:`~.passes.pass_memory_bytes`) and this share of the free memory, kept for the allocator's slack.
TIGHT_MEMORY_MARGIN = 0.1


def default_max_memory(
    layers,
    metric,
    accumulation_dtype: torch.dtype,
    counts: list[int],
    one_top_k: bool,
    free_bytes: int | None = None,
    pass_bytes: int | None = None,
) -> int:
    """The budget selection gets when none is given. One pass over the salience batches wherever
    ``FREE_MEMORY_SHARE`` of ``free_bytes`` (what the device has free) holds every layer's accumulators. Otherwise
    (memory is tight) what is free less ``pass_bytes`` (a salience batch's forward and backward, measured) and
    ``TIGHT_MEMORY_MARGIN`` of it, or where that was not measured ``FREE_MEMORY_SHARE`` of it; never less than the
    floor: the candidate set plus room for accumulators as large as what training adds per entry
    (``TRAINING_STATE_BYTES_PER_ENTRY``: gradient and AdamW moments, at least ``MIN_DEFAULT_ACCUMULATOR_BYTES``), and
    the smallest workable budget (the largest layer; GRaSP: every layer at once). ``free_bytes=None`` (unknown)
    gives the floor."""
    candidates = _candidate_bytes(counts, one_top_k)
    smallest = smallest_budget(layers, metric, accumulation_dtype, candidates)
    room = max(TRAINING_STATE_BYTES_PER_ENTRY * sum(counts), MIN_DEFAULT_ACCUMULATOR_BYTES)
    floor = max(smallest, candidates + room)
    if free_bytes is None:
        return floor
    one_pass = one_pass_budget(layers, metric, accumulation_dtype, candidates)
    if not _memory_is_tight(one_pass, free_bytes) or pass_bytes is None:
        return max(floor, min(one_pass, int(FREE_MEMORY_SHARE * free_bytes)))
    return max(floor, min(one_pass, int((1 - TIGHT_MEMORY_MARGIN) * free_bytes) - pass_bytes))


def _memory_is_tight(one_pass: int, free_bytes: int) -> bool:
    """One pass's budget does not fit ``FREE_MEMORY_SHARE`` of what is free."""
    return one_pass > FREE_MEMORY_SHARE * free_bytes


def _pass_bytes(model, layers, adapter_name, batches, loss_fn) -> int | None:
    """A salience batch's measured forward and backward (:func:`~.passes.pass_memory_bytes`), the most over ranks
    under torch.distributed (every rank must plan the same groups); None where any rank cannot tell."""
    measured = pass_memory_bytes(model, layers, adapter_name, batches[0], loss_fn)
    if world_size() > 1:
        device = layers[0][1].sparse_values[adapter_name].device
        # one reduction: the most measured, and whether any rank could not measure
        most = torch.tensor([-1 if measured is None else measured, measured is None], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        measured = None if most[1].item() else int(most[0].item())
    return measured


def _free_bytes(layers, adapter_name: str) -> int | None:
    """What the layers' device has free, the least over ranks under torch.distributed (every rank must plan the same
    layer groups: their accumulators are summed group by group); None where any rank cannot tell."""
    device = layers[0][1].sparse_values[adapter_name].device
    free = free_memory_bytes(device)
    if world_size() > 1:
        least = torch.tensor([-1 if free is None else free], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(least, op=torch.distributed.ReduceOp.MIN)
        free = None if least.item() < 0 else int(least.item())
    return free


def _candidate_bytes(counts: list[int], one_top_k: bool) -> int:
    """What the chosen entries take while layers are scored: the running top-k's candidates, or (a top-k per
    layer) each scored layer's chosen positions (4 bytes each) and one layer's candidates."""
    if one_top_k:
        return CANDIDATE_BYTES_PER_ENTRY * sum(counts)
    return 4 * sum(counts) + CANDIDATE_BYTES_PER_ENTRY * max(counts, default=0)


def _cost_of_groups(model, layers, plan, num_batches: int) -> str:
    """What scoring in ``plan``'s layer groups costs in forward+backward passes, in words for the tight-memory line:
    where their decoder blocks can be replayed, the recording pass and the blocks each group's replay runs (a block
    split between groups once per group), at most a whole pass per group."""
    whole = plan.passes * num_batches
    found = group_blocks(model, layers, plan.groups) if len(plan.groups) >= MIN_REPLAYED_GROUPS else None
    if found is None or plan.passes != len(plan.groups):
        return f"up to {whole}"
    blocks, ranges = found
    replayed = num_batches + replay_passes(sum(map(len, ranges)), len(blocks), num_batches)
    return f"about {replayed} where their decoder blocks can be replayed, up to {whole} where not"


@dataclass
class _Passes:
    """How the salience passes run: the caller's data and options (see :func:`select_mask`)."""

    data: Iterable | None
    num_batches: int | None
    loss_fn: Callable[[Any, Any], torch.Tensor] | None
    accumulation_dtype: torch.dtype | None  # None: the config's selection_accumulation_dtype
    layers_per_pass: int | None
    max_memory: int | None


def _choose(
    caller, model, layers, adapter_name, config, metric, passes: _Passes, counts, ties, one_top_k, report
) -> list[torch.Tensor]:
    """Score the layers group by group under the memory budget and keep, per layer, its chosen positions (sorted
    int64): one top-k over all layers (``one_top_k``) or a top-``counts[i]`` per layer. Fills in the report's
    passes, batches, budget and peak memory. The model is not changed."""
    batches = salience_batches(passes.data, passes.num_batches, config, metric, caller)
    dtype = passes.accumulation_dtype or config.torch_selection_accumulation_dtype
    max_memory = config.selection_max_memory if passes.max_memory is None else passes.max_memory
    candidates = _candidate_bytes(counts, one_top_k)
    needed = one_pass_budget(layers, metric, dtype, candidates)
    free = None
    if max_memory is None:
        free = _free_bytes(layers, adapter_name) if metric.needs_data else None
        if free is not None and batches and _memory_is_tight(needed, free):
            # measure what a salience batch's forward and backward take (one batch more)
            report.pass_memory_bytes = _pass_bytes(model, layers, adapter_name, batches, passes.loss_fn)
        max_memory = default_max_memory(layers, metric, dtype, counts, one_top_k, free, report.pass_memory_bytes)
    elif isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory <= 0:
        raise ValueError(f"{caller}: max_memory must be a positive int (bytes) or None, got {max_memory!r}")
    plan = plan_groups(layers, metric, dtype, candidates, max_memory, passes.layers_per_pass, caller)
    num_batches = 0 if batches is None else len(batches)
    if free is not None and len(plan.groups) > 1 and passes.layers_per_pass is None:
        logger.warning(
            "%s: memory is tight (%.2f GiB free): the %d layers are scored in %d groups over %d batches (%s "
            "forward+backward passes instead of %d); SparseConfig.selection_max_memory=%d (%.2f GiB) would score "
            "them in one pass, and selection_accumulation_dtype='bfloat16' halves the accumulators",
            caller,
            free / 2**30,
            len(layers),
            len(plan.groups),
            num_batches,
            _cost_of_groups(model, layers, plan, num_batches),
            plan.passes // len(plan.groups) * num_batches,
            needed,
            needed / 2**30,
        )
    if one_top_k:
        running = RunningTopK(sum(counts), ties)
        held = lambda: running.nbytes
    else:
        chosen: list[torch.Tensor] = []
        held = lambda: sum(c.numel() * c.element_size() for c in chosen)
    for position, score in layer_scores(
        model, layers, adapter_name, config, metric, batches, passes.loss_fn, dtype, plan, held
    ):
        if one_top_k:
            running.add(score, in_place=True)
        else:
            top = select_top_k([score], counts[position], [ties[position]], in_place=True)[0]
            chosen.append(top.to(index_dtype(layers[position][1].num_weight_entries)))
        del score
    if one_top_k:
        chosen = running.result()
    report.num_batches = num_batches
    report.passes = plan.passes
    report.replayed = plan.replayed
    report.replay_bytes = plan.replay_bytes
    report.replay_recordings = plan.recordings
    report.replayed_blocks, report.decoder_blocks = plan.replayed_blocks, plan.blocks
    report.max_memory = plan.budget
    report.extra_memory_bytes = plan.peak_bytes
    return chosen


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
    tie-breaks that make a top-k of these scores the mask ``select_mask`` picks. It returns a score per weight of
    every targeted layer (4 bytes each): meant for inspection and tests on small models, not for selection at scale,
    which :func:`select_mask` does in bounded memory."""
    _, adapter_name, config, metric, layers = _prepare("salience_scores", model, adapter_name, data)
    batches = salience_batches(data, num_batches, config, metric, "salience_scores")
    plan = plan_groups(layers, metric, accumulation_dtype, 0, None, layers_per_pass, "salience_scores")
    scores = layer_scores(model, layers, adapter_name, config, metric, batches, loss_fn, accumulation_dtype, plan)
    return {layers[position][0]: score for position, score in scores}


def update_mask(
    model: nn.Module,
    data: Iterable | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    num_batches: int | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    adapter_name: str | None = None,
    accumulation_dtype: torch.dtype | None = None,
    layers_per_pass: int | None = None,
    max_memory: int | None = None,
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
        model, data, num_batches, loss_fn, adapter_name, accumulation_dtype, layers_per_pass, max_memory: as for
            :func:`select_mask` (layer groups under a memory budget; each layer keeps its ``k``).
        optimizer: the optimizer training the values, whose per-entry state is remapped.

    Returns:
        A :class:`SelectionReport` whose ``per_layer`` counts the entries that changed in each layer.
    """
    start = time.perf_counter()
    _, adapter_name, config, metric, layers = _prepare("update_mask", model, adapter_name, data)
    counts = [layer.sparse_indices[adapter_name].numel() for _, layer in layers]
    report = SelectionReport(config.selection, "per-layer k kept", 0)
    passes = _Passes(data, num_batches, loss_fn, accumulation_dtype, layers_per_pass, max_memory)
    ties = tie_generators(config, layers)
    chosen = _choose("update_mask", model, layers, adapter_name, config, metric, passes, counts, ties, False, report)
    # Entries move only once every layer is scored: every pass sees the model as it was.
    for (name, layer), new in zip(layers, chosen):
        report.per_layer[name] = move_entries(layer, adapter_name, new, optimizer)
        layer.mask_chosen.add(adapter_name)
    report.seconds = time.perf_counter() - start
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
