"""The passes that measure salience: forward + backward over batches while every sparse layer's
:class:`~peft_sparse.selection.salience.GradientProbe` collects its dense weight gradient (and the square, for
Fisher), GRaSP's second, perturbed pass, and the scoring of each layer's entries by the config's metric.
SynFlow's data-free pass lives in :mod:`peft_sparse.selection.synflow`."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .._distributed import world_size
from .._memory import free_memory_bytes, peak_memory_bytes, process_status_kib, reset_peak_memory
from ..tuner.indices import layer_seed
from .backward import (
    CUT_FROM_GRAPH,
    backward_stops_below,
    effective_weight,
    probe_backward,
    restore_gradients,
    salience_loss,
)
from .replay import NotReplayable, record_boundaries, replay_group
from .salience import GradientProbe
from .synflow import synflow_statistics

logger = logging.getLogger(__name__)

__all__ = [
    "ScoringPlan",
    "effective_weight",
    "layer_scores",
    "plan_groups",
    "probe_backward",
    "run_passes",
    "salience_batches",
    "smallest_budget",
]

# Layer groups scored by block replay from this many on: replay costs about 7/3 training steps per batch, whole passes
# (2G + 2) / 3, which is less for two groups.
MIN_REPLAYED_GROUPS = 3
# Of the host memory free when the groups are recorded (less, on a CPU, the largest group's accumulators, which come
# after), the share block replay's boundaries may take; beyond it they are recorded in rounds.
REPLAY_HOST_SHARE = 0.5

# GRaSP's Hessian-vector product is (grad(W + eps G) - grad(W)) / eps with eps = this * ||W|| / ||G||: small enough
# for the first-order difference to be accurate, large enough to stay clear of fp32 cancellation.
GRASP_RELATIVE_STEP = 1e-3


def run_passes(model, layers, adapter_name, batches, loss_fn, description) -> None:
    """Forward + backward over ``batches``; the layers' probes collect the dense gradients."""
    values = [layer.sparse_values[adapter_name] for _, layer in layers]
    probes = [layer.salience_probe for _, layer in layers]
    calls_before = [(probe.forward_calls, probe.backward_calls) for probe in probes]
    with backward_stops_below(model, layers):
        _forward_backward(model, layers, values, probes, batches, loss_fn, description)
    check_reached(layers, adapter_name, calls_before, len(batches))
    _all_reduce_probes(layers)


def check_reached(layers, adapter_name, calls_before, num_batches: int) -> None:
    """Refuse where a layer ran in the forward but no backward reached it (``calls_before``: each probe's forward
    and backward calls before the pass).

    A layer with entries is in the graph whenever its input or its values are (the values require grad here); a
    layer without entries detaches its empty values (see SparseLayer.adapter_delta), so it is only there when its
    input requires grad, and is left out. A layer that ran in the forward but that no backward reached holds zeros:
    its entries would be ranked by the seeded tie-breaks alone, a mask that claims to be salient."""
    unreached = [
        name
        for (name, layer), (forwards, backwards) in zip(layers, calls_before)
        if layer.sparse_values[adapter_name].numel()
        and layer.salience_probe.forward_calls > forwards
        and layer.salience_probe.backward_calls == backwards
    ]
    if unreached:
        raise ValueError(
            f"select_mask: {len(unreached)} sparse layer(s) (e.g. {unreached[:3]}) computed the loss "
            f"of {num_batches} salience batch(es), but no gradient reached them in the backward. {CUT_FROM_GRAPH}"
        )


def _forward_backward(model, layers, values, probes, batches, loss_fn, description) -> None:
    device = values[0].device
    for seen, batch in enumerate(tqdm(batches, desc=description, leave=False)):
        replays_before = sum(probe.forward_calls_without_grad for probe in probes)
        loss = salience_loss(model, batch, device, loss_fn, seen)
        replays = sum(probe.forward_calls_without_grad for probe in probes) > replays_before
        probe_backward(model, loss, values, replays_forward=replays)
        for _, layer in layers:
            layer.salience_probe.end_batch()


def _record_forward(layer, args, output) -> None:
    """Forward hook on a probed layer (installed by :func:`_probes` for a pass): counts its forward calls."""
    layer.salience_probe.record_forward()


def _all_reduce_probes(layers) -> None:
    """Under torch.distributed, sum every rank's accumulators, so each rank scores the same global-batch salience
    (and, with the same seeded tie-breaks, selects the same entries)."""
    if world_size() == 1:
        return
    for _, layer in layers:
        probe = layer.salience_probe
        for tensor in (probe.grad, probe.grad_square):
            if tensor is not None:
                torch.distributed.all_reduce(tensor)


# Bytes per targeted weight held while salience is estimated, by what a metric needs: its accumulators (in units of
# the accumulation dtype: the gradient sum; Fisher adds the sum of squares and the batch buffer; GRaSP holds the first
# gradient, the weight offset, the perturbed sum and their difference) and, while one layer is scored in place,
# temporaries: a fresh fp32 weight where the metric reads it (plus the compute-dtype copy a quantised base
# dequantises through) and fp32 copies of accumulators kept in another dtype.
_ACCUMULATORS = {"fisher": 3, "grasp": 4}


def accumulator_bytes_per_weight(metric, accumulation_dtype: torch.dtype) -> int:
    """Bytes per weight a layer's salience accumulators hold for the whole pass over the data."""
    if metric.name == "synflow":
        return accumulation_dtype.itemsize + 4  # the gradient, and the linearised |W| scored with it
    if not metric.needs_data:
        return 0
    return _ACCUMULATORS.get(metric.name, 1) * accumulation_dtype.itemsize


def scoring_bytes_per_weight(metric, accumulation_dtype: torch.dtype) -> int:
    """Bytes per weight of the temporaries while one layer is scored (after its accumulators are complete)."""
    converted = 0
    if metric.needs_data and accumulation_dtype != torch.float32:
        converted = 4 * (2 if metric.needs_grad_square else 1) + (8 if metric.needs_hessian else 0)
    if metric.name == "random":
        return 4  # the draws
    return (6 if metric.needs_weight and metric.name != "synflow" else 0) + converted


@dataclass
class ScoringPlan:
    """How salience is computed under a memory budget: which layers share a pass over the data, and the bytes that
    each part needs (all per process; on a GPU, device memory)."""

    groups: list[range]
    budget: int | None  # None: no budget (layers_per_pass alone decides)
    passes: int  # passes over the data (GRaSP: two per group); 0 for data-free metrics without a pass
    peak_bytes: int = 0  # filled in by layer_scores: the most this selection held at once
    replayed: bool = False  # filled in by layer_scores: groups scored by block replay (see .replay)
    replay_bytes: int = 0  # filled in by layer_scores: the recorded block boundaries (host memory, not in the budget)
    recordings: int = 0  # filled in by layer_scores: the recording passes of block replay (rounds, where host memory
    # holds the boundaries of only some groups at a time)
    # filled in by layer_scores: the decoder blocks the groups' replays ran per batch (a block split between groups
    # once for each), and the blocks a whole pass runs
    replayed_blocks: int = 0
    blocks: int = 0


def plan_groups(
    layers,
    metric,
    accumulation_dtype: torch.dtype,
    candidate_bytes: int,
    max_memory: int | None,
    layers_per_pass: int | None,
    where: str,
) -> ScoringPlan:
    """Split the layers, in order, into groups whose accumulators share one pass over the data: as many layers as
    ``max_memory`` leaves room for next to ``candidate_bytes`` (and at most ``layers_per_pass``). GRaSP is always
    one group of all layers.

    Raises:
        ValueError: if ``max_memory`` is too small for even one layer; the message names the smallest workable
            value.
    """
    if layers_per_pass is not None and (
        isinstance(layers_per_pass, bool) or not isinstance(layers_per_pass, int) or layers_per_pass < 1
    ):
        raise ValueError(f"layers_per_pass must be a positive int or None, got {layers_per_pass!r}")
    budget = max_memory
    held = accumulator_bytes_per_weight(metric, accumulation_dtype)
    scoring = scoring_bytes_per_weight(metric, accumulation_dtype)
    sizes = [layer.num_weight_entries for _, layer in layers]
    if metric.needs_hessian and layers_per_pass is not None and layers_per_pass < len(layers):
        raise ValueError(
            f"{where}: selection='grasp' perturbs every layer at once for its Hessian-vector product, so its layers "
            f"cannot be split into groups (layers_per_pass={layers_per_pass} < {len(layers)} layers); use "
            "layers_per_pass=None, or a metric that scores layer groups ('gradient', 'snip', 'fisher', ...)"
        )
    if max_memory is not None:
        smallest = smallest_budget(layers, metric, accumulation_dtype, candidate_bytes)
        if max_memory < smallest:
            what = (
                f"hold GRaSP's accumulators for all {sum(sizes):,} weights at once (its Hessian-vector product "
                "perturbs every layer together)"
                if metric.needs_hessian
                else f"score even the largest layer ({max(sizes):,} weights, {held + scoring} bytes each)"
            )
            raise ValueError(
                f"{where}: max_memory={max_memory} bytes is too small to {what} next to the top-k candidates "
                f"({candidate_bytes} bytes); the smallest workable value is {smallest}"
            )
    if metric.needs_hessian:
        cap = len(layers)
        max_memory = None  # one group, checked above
    else:
        cap = layers_per_pass or len(layers)
    groups, start = [], 0
    while start < len(layers):
        end = start + 1
        while end < len(layers) and end - start < cap:
            group = sizes[start : end + 1]
            if max_memory is not None and candidate_bytes + held * sum(group) + scoring * max(group) > max_memory:
                break
            end += 1
        groups.append(range(start, end))
        start = end
    if metric.name == "synflow":
        passes = len(groups)
    elif metric.needs_hessian:  # the gradient, then the perturbed gradient
        passes = 2 * len(groups)
    elif metric.needs_data:
        passes = len(groups)
    else:
        passes = 0
    return ScoringPlan(groups, budget, passes)


def one_pass_budget(layers, metric, accumulation_dtype: torch.dtype, candidate_bytes: int) -> int:
    """The ``max_memory`` that scores every layer in one pass: the candidates, every layer's accumulators and the
    largest layer's scoring."""
    held = accumulator_bytes_per_weight(metric, accumulation_dtype)
    scoring = scoring_bytes_per_weight(metric, accumulation_dtype)
    sizes = [layer.num_weight_entries for _, layer in layers]
    return candidate_bytes + held * sum(sizes) + scoring * max(sizes)


def smallest_budget(layers, metric, accumulation_dtype: torch.dtype, candidate_bytes: int) -> int:
    """The least ``max_memory`` that works: the candidates plus one layer's accumulators and scoring (GRaSP: all
    layers' accumulators, which it needs at once)."""
    if metric.needs_hessian:
        return one_pass_budget(layers, metric, accumulation_dtype, candidate_bytes)
    held = accumulator_bytes_per_weight(metric, accumulation_dtype)
    scoring = scoring_bytes_per_weight(metric, accumulation_dtype)
    return candidate_bytes + max(layer.num_weight_entries for _, layer in layers) * (held + scoring)


def layer_scores(
    model,
    layers,
    adapter_name,
    config,
    metric,
    batches,
    loss_fn,
    accumulation_dtype,
    plan: ScoringPlan,
    held_elsewhere=lambda: 0,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Salience of every entry of every layer, yielded as ``(layer position, fp32 score)`` in layer order, one layer
    group (one pass over ``batches``) at a time. Only the current group's accumulators and one layer's score are
    alive at once: a consumer that keeps what it needs from each score (a running top-k) holds no per-weight buffer
    of the whole model. The yielded score is the consumer's: it may be overwritten in place.

    After the generator is exhausted, ``plan.peak_bytes`` holds the peak of accumulators + scoring temporaries +
    ``held_elsewhere()`` (the consumer's own state, e.g. the candidate set) seen at any group.
    """
    generators = [torch.Generator().manual_seed(layer_seed(config.seed, name)) for name, _ in layers]
    scoring = scoring_bytes_per_weight(metric, accumulation_dtype)
    plan.peak_bytes = 0
    boundaries, first = None, 0  # the current recording and the first group it covers
    replay = len(plan.groups) >= MIN_REPLAYED_GROUPS and metric.needs_data and not metric.needs_hessian
    host_limit = _replay_host_limit(layers, adapter_name, metric, accumulation_dtype, plan) if replay else None
    for group_index, positions in enumerate(plan.groups):
        if replay and (boundaries is None or group_index >= first + len(boundaries.ranges)):
            boundaries = None  # the previous round's boundaries go before the next round is recorded
            with _values_require_grad(layers, adapter_name):
                values = [layer.sparse_values[adapter_name] for _, layer in layers]
                boundaries = record_boundaries(
                    model, layers, plan.groups[group_index:], batches, loss_fn, values, host_limit
                )
            if boundaries is None:
                replay = False  # this group and the rest take whole passes
            else:
                first = group_index
                plan.replayed = group_index == 0 or plan.replayed
                plan.recordings += 1
                plan.passes += 1
                plan.replay_bytes = max(plan.replay_bytes, boundaries.nbytes)
        group = [layers[i] for i in positions]
        statistics = [{} for _ in group]
        probe_bytes = 0
        if metric.name == "synflow":
            probe_bytes = synflow_statistics(model, group, adapter_name, accumulation_dtype, statistics)
        elif metric.needs_data:
            with _probes(group, adapter_name, accumulation_dtype, keep_square=metric.needs_grad_square):
                description = f"salience ({config.selection}) layers {positions.start + 1}-{positions.stop}"
                if replay and _replayed(model, group, adapter_name, boundaries, group_index - first, batches):
                    plan.replayed_blocks += len(boundaries.ranges[group_index - first])
                    plan.blocks = len(boundaries.blocks)
                else:
                    plan.replayed = False  # this group took a whole pass: passes x batches is the cost's bound
                    run_passes(model, group, adapter_name, batches, loss_fn, description)
                if metric.needs_hessian:
                    hessian_grad_pass(model, group, adapter_name, batches, loss_fn, statistics)
                probe_bytes = sum(layer.salience_probe.nbytes for _, layer in group)
                for stats, (_, layer) in zip(statistics, group):
                    stats.setdefault("grad", layer.salience_probe.grad)
                    stats["grad_square"] = layer.salience_probe.grad_square
        largest = max(layer.num_weight_entries for _, layer in group)
        plan.peak_bytes = max(plan.peak_bytes, probe_bytes + scoring * largest + held_elsewhere())
        for position, stats, (_, layer) in zip(positions, statistics, group):
            weight = stats.pop("linearised_weight", None)
            if weight is None and metric.needs_weight:
                weight = effective_weight(layer, adapter_name)
            stats = {key: value.float() for key, value in stats.items() if value is not None}
            score = metric.score(
                weight=weight,
                shape=layer.logical_shape,
                device=layer.weight_device,
                generator=generators[position],
                **stats,
            ).float()
            del weight, stats
            statistics[position - positions.start] = None  # the layer's accumulators go before the next is scored
            yield position, score
            del score
        plan.peak_bytes = max(plan.peak_bytes, held_elsewhere())


def pass_memory_bytes(model, layers, adapter_name, batch, loss_fn) -> int | None:
    """The memory one salience batch's forward and backward add on the layers' device, without probes: activations,
    the loss and the values' gradients, as measured on ``batch``. On a GPU the allocator's peak since its last reset
    less what was allocated before (not reset here: an earlier, higher peak makes this an over-estimate, the safe
    side); on a CPU the resident set's peak, restarted first (:func:`~peft_sparse._memory.reset_peak_memory`).
    None on other devices."""
    device = layers[0][1].sparse_values[adapter_name].device
    resident = process_status_kib("VmRSS") if device.type == "cpu" else None
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
    elif resident is not None:
        before = resident * 1024
        reset_peak_memory("cpu")
    else:
        return None
    with _values_require_grad(layers, adapter_name):
        loss = salience_loss(model, batch, device, loss_fn, 0)
        with restore_gradients(model):
            loss.backward()
        del loss
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_memory_bytes("cpu")
    return None if peak is None else max(0, peak - before)


def _replay_host_limit(layers, adapter_name, metric, accumulation_dtype, plan: ScoringPlan) -> int | None:
    """The bytes block replay's boundaries may take: ``REPLAY_HOST_SHARE`` of the host's free memory, less on a CPU
    device the largest group's accumulators and scoring, which share that memory and come after the recording; None
    where the host's free memory is unknown."""
    free = free_memory_bytes("cpu")
    if free is None:
        return None
    if layers[0][1].sparse_values[adapter_name].device.type == "cpu":
        held = accumulator_bytes_per_weight(metric, accumulation_dtype)
        scoring = scoring_bytes_per_weight(metric, accumulation_dtype)
        sizes = [[layers[i][1].num_weight_entries for i in group] for group in plan.groups]
        free -= max(held * sum(group) + scoring * max(group) for group in sizes)
    return max(0, int(REPLAY_HOST_SHARE * free))


def _replayed(model, group, adapter_name, boundaries, group_index: int, batches) -> bool:
    """Score ``group`` by replaying its decoder blocks (:func:`~.replay.replay_group`); ``False`` where the replay
    does not reproduce the recording (nothing accumulated: the caller runs a whole pass instead)."""
    probes = [layer.salience_probe for _, layer in group]
    calls_before = [(probe.forward_calls, probe.backward_calls) for probe in probes]
    try:
        replay_group(boundaries, group_index, probes, model, group[0][1].sparse_values[adapter_name].device)
    except NotReplayable as why:
        logger.info("select_mask: %s; this layer group is scored by a whole pass instead", why)
        return False
    check_reached(group, adapter_name, calls_before, len(batches))
    return True


@contextmanager
def _values_require_grad(layers, adapter_name):
    """Every layer's values require grad within the block (the recording pass needs the blocks in the graph, as a
    group's pass does); restored afterwards."""
    values = [layer.sparse_values[adapter_name] for _, layer in layers]
    was = [v.requires_grad for v in values]
    try:
        for v in values:
            v.requires_grad_(True)
        yield
    finally:
        for v, flag in zip(values, was):
            v.requires_grad_(flag)


def salience_batches(data, num_batches: int | None, config, metric, caller: str) -> list | None:
    """The first ``num_batches`` (default ``config.salience_batches``) batches of ``data``, drawn once: every pass
    over the data (one per layer group) then sees the same batches, even from a shuffling data loader, and the
    loader is iterated once, as by a single pass. Batches stay where the loader put them (token ids: a few bytes per
    token). ``None`` for a data-free metric."""
    if num_batches is None:
        num_batches = config.salience_batches
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive int, got {num_batches!r}")
    if not metric.needs_data:
        return None
    batches = list(itertools.islice(iter(data), num_batches))
    if not batches:
        raise ValueError(f"{caller}: `data` yielded no batch")
    for seen, batch in enumerate(batches):
        if not isinstance(batch, (Mapping, torch.Tensor)):
            raise TypeError(
                f"{caller}: salience batch {seen} (0-based) is a {type(batch).__name__}; batches must be dicts of the "
                "model's keyword arguments, as a Trainer's data collator gives them (e.g. {'input_ids': ids, "
                "'labels': ids}), or input-id tensors with a loss_fn (a TensorDataset yields tuples: name them in a "
                "collate_fn)"
            )
    return batches


def hessian_grad_pass(model, group, adapter_name, batches, loss_fn, statistics) -> None:
    """GRaSP: H G by a finite difference of gradients, (G(W + eps G) - G(W)) / eps, one more pass over the data.
    The perturbation eps G moves every layer of the group at once, so H G has the cross-layer terms only within
    the group: GRaSP is therefore always one group of all layers (see :func:`plan_groups`)."""
    weight_norm = sum(float(layer.dequantized_weight().square().sum()) for _, layer in group) ** 0.5
    grad_norm = sum(float(layer.salience_probe.grad.float().square().sum()) for _, layer in group) ** 0.5
    if grad_norm == 0.0:
        for stats, (_, layer) in zip(statistics, group):
            stats["hessian_grad"] = torch.zeros_like(layer.salience_probe.grad)
        return
    step = GRASP_RELATIVE_STEP * weight_norm / grad_norm
    for stats, (_, layer) in zip(statistics, group):
        probe = layer.salience_probe
        stats["grad"] = probe.grad.clone()
        probe.weight_offset = probe.grad * step
        probe.grad = torch.zeros_like(probe.grad)
    run_passes(model, group, adapter_name, batches, loss_fn, "salience (grasp, perturbed)")
    for stats, (_, layer) in zip(statistics, group):
        probe = layer.salience_probe
        stats["hessian_grad"] = (probe.grad - stats["grad"]) / step
        probe.weight_offset = None


@contextmanager
def _probes(group, adapter_name, accumulation_dtype, keep_square: bool):
    """Install a :class:`GradientProbe` in every layer of the group (its values made to require grad so that the
    backward reaches the layer, a forward hook counting the layer's forward calls); remove them and restore
    ``requires_grad`` afterwards, whatever happens."""
    was_trainable = []
    hooks = []
    try:
        for _, layer in group:
            layer.salience_probe = GradientProbe(
                layer.logical_shape, accumulation_dtype, layer.weight_device, keep_square=keep_square
            )
            hooks.append(layer.register_forward_hook(_record_forward))
            values = layer.sparse_values[adapter_name]
            was_trainable.append(values.requires_grad)
            values.requires_grad_(True)
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for (_, layer), trainable in zip(group, was_trainable):
            layer.salience_probe = None
            layer.sparse_values[adapter_name].requires_grad_(trainable)
