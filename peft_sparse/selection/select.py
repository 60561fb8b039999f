"""``select_mask``: choose every sparse layer's trainable entries by salience (SPEFT, Algorithm 1, t = 1)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .._distributed import is_sharded, whole, world_size, write_whole
from ..ops import scatter_add
from ..tuner.budget import allocate_budget
from ..tuner.config import SparseConfig
from ..tuner.indices import layer_seed
from ..tuner.layer import SparseLayer
from .optim import reassign_entries, surviving_positions
from .salience import METRICS, GradientProbe
from .topk import select_top_k

__all__ = ["SelectionReport", "select_mask", "update_mask"]

# GRaSP's Hessian-vector product is (grad(W + eps G) - grad(W)) / eps with eps = this * ||W|| / ||G||: small enough
# for the first-order difference to be accurate, large enough to stay clear of fp32 cancellation.
GRASP_RELATIVE_STEP = 1e-3


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


def _resolve(model: nn.Module, adapter_name: Optional[str]) -> tuple[nn.Module, str, SparseConfig]:
    tuner = getattr(model, "base_model", model)
    peft_config = getattr(tuner, "peft_config", None)
    if not isinstance(peft_config, dict):
        raise TypeError(f"select_mask: expected a peft model with a sparse adapter, got {type(model).__name__}")
    if adapter_name is None:
        active = getattr(tuner, "active_adapter", None)
        adapter_name = active[0] if isinstance(active, (list, tuple)) else active
    if adapter_name not in peft_config:
        raise ValueError(f"select_mask: adapter_name {adapter_name!r} does not exist; adapters: {list(peft_config)}")
    config = peft_config[adapter_name]
    if not isinstance(config, SparseConfig):
        raise ValueError(f"select_mask: adapter {adapter_name!r} is a {type(config).__name__}, not a SparseConfig")
    return tuner.model if hasattr(tuner, "model") else tuner, adapter_name, config


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):  # dicts, and transformers' BatchEncoding (a UserDict)
        return {key: _to_device(value, device) for key, value in batch.items()}
    return batch


def _run_passes(model, layers, adapter_name, data, num_batches, loss_fn, description) -> int:
    """Forward + backward over up to ``num_batches`` batches; the layers' probes collect the dense gradients."""
    values = [layer.sparse_values[adapter_name] for _, layer in layers]
    device = values[0].device
    seen = 0
    total = min(num_batches, len(data)) if hasattr(data, "__len__") else num_batches
    for batch in tqdm(itertools.islice(iter(data), num_batches), total=total, desc=description, leave=False):
        batch = _to_device(batch, device)
        outputs = model(**batch) if isinstance(batch, Mapping) else model(batch)
        loss = loss_fn(outputs, batch) if loss_fn is not None else outputs.loss
        if loss is None:
            raise ValueError("select_mask: the model returned no loss; pass labels in the batches or a loss_fn")
        if not bool(torch.isfinite(loss.detach()).all()):
            # Non-finite gradients would rank entries by NaN/inf, i.e. by tie-breaking: a mask chosen at random
            # that claims to be salient.
            raise ValueError(
                f"select_mask: the loss of salience batch {seen} (0-based) is {loss.detach().float().tolist()}; "
                "salience needs finite losses (check the batch's inputs and labels, or the model's dtype)"
            )
        _probe_backward(model, loss, values)
        for _, layer in layers:
            layer.salience_probe.end_batch()
        seen += 1
    if seen == 0:
        raise ValueError("select_mask: `data` yielded no batch")
    _all_reduce_probes(layers)
    return seen


def _probe_backward(model, loss: torch.Tensor, values: list[torch.Tensor]) -> None:
    """Run the backward that feeds the layers' salience probes, leaving every parameter's ``.grad`` as it was, so
    that selection leaves no trace in an optimizer's view of the model.

    On one process or under DDP, ``autograd.grad`` with respect to the values does that. Under FSDP2 the forward
    computes with unsharded copies of the parameters, so the sharded values are not in the graph: ``autograd.grad``
    would run nothing (and the probes would see no gradient, i.e. the mask would be chosen by tie-breaks). There a
    regular ``backward`` runs, and the gradients it leaves (FSDP reduce-scatters them into the sharded ``.grad``)
    are put back to what they were.
    """
    if not any(is_sharded(v) for v in values):
        torch.autograd.grad(loss, values, allow_unused=True)
        return
    parameters = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in parameters]
    for p in parameters:
        p.grad = None
    loss.backward()
    for p, grad in zip(parameters, saved):
        p.grad = grad


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


def select_mask(
    model: nn.Module,
    data: Optional[Iterable] = None,
    *,
    num_batches: Optional[int] = None,
    loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
    adapter_name: Optional[str] = None,
    accumulation_dtype: torch.dtype = torch.float32,
    layers_per_pass: Optional[int] = None,
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
    root, adapter_name, config, metric, layers = _prepare("select_mask", model, adapter_name, data)
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
    scores, batches_seen, peak = _compute_scores(
        model, layers, adapter_name, config, metric, data, num_batches, loss_fn, accumulation_dtype, layers_per_pass
    )
    tie_generators = _tie_generators(config, layers)
    if keep_layer_sizes:
        counts = [layer.sparse_indices[adapter_name].numel() for _, layer in layers]
    else:
        counts = allocate_budget(
            [layer.num_weight_entries for _, layer in layers], config.density, config.num_tunable_weights,
            config.budget
        )
    if config.budget == "global" and not keep_layer_sizes:
        chosen = select_top_k(scores, sum(counts), tie_generators)
    else:
        chosen = [select_top_k([s], c, [g])[0] for s, c, g in zip(scores, counts, tie_generators)]
    report = SelectionReport(config.selection, "per-layer k kept" if keep_layer_sizes else config.budget,
                             batches_seen)
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


def update_mask(
    model: nn.Module,
    data: Optional[Iterable] = None,
    *,
    optimizer: Optional[torch.optim.Optimizer] = None,
    num_batches: Optional[int] = None,
    loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
    adapter_name: Optional[str] = None,
    accumulation_dtype: torch.dtype = torch.float32,
    layers_per_pass: Optional[int] = None,
) -> SelectionReport:
    """One dynamic mask update (SPEFT, ``update="dynamic"``): re-rank every layer's entries and move its ``k``.

    Salience is recomputed on the weights the model computes with (base plus the adapter's whole delta, so the
    deltas trained so far are folded in), and each layer keeps its current ``k``: its top-``k`` entries become the
    trainable set. Nothing learned is lost and the model's function does not change: an entry that leaves the
    trainable set keeps its delta in the layer's *residual* (``sparse_residual_indices/values``: used by the
    forward, merges and ``save_pretrained``, no longer trained; for a quantised base this is also what avoids
    re-quantising), and an entry that returns from the residual resumes from its delta. Indices are rewritten in
    place with :func:`~peft_sparse.selection.optim.reassign_entries`, so the values parameters and the optimizer
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
    scores, batches_seen, peak = _compute_scores(
        model, layers, adapter_name, config, metric, data, num_batches, loss_fn, accumulation_dtype, layers_per_pass
    )
    report = SelectionReport(config.selection, "per-layer k kept", batches_seen)
    for (name, layer), score, generator in zip(layers, scores, _tie_generators(config, layers)):
        new = select_top_k([score], layer.sparse_indices[adapter_name].numel(), [generator])[0]
        report.per_layer[name] = _move_entries(layer, adapter_name, new, optimizer)
        layer.mask_chosen.add(adapter_name)
    report.seconds = time.perf_counter() - start
    report.extra_memory_bytes = peak
    return report


def _move_entries(layer, adapter_name: str, new: torch.Tensor, optimizer) -> int:
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
    root, adapter_name, config = _resolve(model, adapter_name)
    metric = METRICS[config.selection]
    layers = [(n, m) for n, m in root.named_modules() if isinstance(m, SparseLayer) and adapter_name in m.sparse_values]
    if not layers:
        raise ValueError(f"{caller}: no sparse layer holds adapter {adapter_name!r}")
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"{caller}: layers {merged[:3]} are merged; unmerge the adapter before selecting")
    if metric.needs_data and data is None:
        raise ValueError(f"{caller}: SparseConfig.selection={config.selection!r} needs `data` (batches of training data)")
    return root, adapter_name, config, metric, layers


def _tie_generators(config, layers):
    return [torch.Generator().manual_seed(layer_seed(config.seed + 1, name)) for name, _ in layers]


def _effective_weight(layer, adapter_name: str) -> torch.Tensor:
    """fp32 ``W0 + delta``: the weight the layer computes with (its trained delta folded in)."""
    weight = layer.dequantized_weight(torch.float32)
    return scatter_add(weight, *layer.adapter_delta(adapter_name, detach=True))


def _compute_scores(
    model, layers, adapter_name, config, metric, data, num_batches, loss_fn, accumulation_dtype, layers_per_pass
):
    """Salience of every entry of every layer; returns (scores, batches seen, peak extra bytes)."""
    if num_batches is None:
        num_batches = config.salience_batches
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive int, got {num_batches!r}")
    if layers_per_pass is not None and (not isinstance(layers_per_pass, int) or layers_per_pass < 1):
        raise ValueError(f"layers_per_pass must be a positive int or None, got {layers_per_pass!r}")
    generators = [torch.Generator().manual_seed(layer_seed(config.seed, name)) for name, _ in layers]
    scores: list[torch.Tensor] = []
    peak = held = 0
    batches_seen = 0
    group_size = layers_per_pass or len(layers)
    for group_start in range(0, len(layers), group_size):
        group = layers[group_start : group_start + group_size]
        group_generators = generators[group_start : group_start + group_size]
        statistics = [dict() for _ in group]
        probe_bytes = 0
        if metric.name == "synflow":
            probe_bytes = _synflow_statistics(model, group, adapter_name, accumulation_dtype, statistics)
        elif metric.needs_data:
            was_trainable = []
            for _, layer in group:
                layer.salience_probe = GradientProbe(
                    layer.logical_shape, accumulation_dtype, layer.weight_device, keep_square=metric.needs_grad_square
                )
                values = layer.sparse_values[adapter_name]
                was_trainable.append(values.requires_grad)
                values.requires_grad_(True)
            try:
                description = f"salience ({config.selection}) layers {group_start + 1}-{group_start + len(group)}"
                batches_seen = _run_passes(model, group, adapter_name, data, num_batches, loss_fn, description)
                if metric.needs_hessian:
                    _hessian_grad_pass(model, group, adapter_name, data, num_batches, loss_fn, statistics)
                probe_bytes = sum(layer.salience_probe.nbytes for _, layer in group)
                for stats, (_, layer) in zip(statistics, group):
                    probe = layer.salience_probe
                    stats.setdefault("grad", probe.grad)
                    stats["grad_square"] = probe.grad_square
            finally:
                for (_, layer), trainable in zip(group, was_trainable):
                    layer.salience_probe = None
                    layer.sparse_values[adapter_name].requires_grad_(trainable)
        # The group's scores are computed while its accumulators are still alive; all scores are kept (the top-k
        # needs them), so the peak is every earlier score + this group's accumulators + this group's scores.
        for stats, (_, layer), generator in zip(statistics, group, group_generators):
            weight = stats.pop("linearised_weight", None)
            weight = _effective_weight(layer, adapter_name) if weight is None else weight
            stats = {key: value.float() for key, value in stats.items() if value is not None}
            score = metric.score(weight=weight, generator=generator, **stats).float()
            scores.append(score)
            held += score.numel() * score.element_size()
        peak = max(peak, held + probe_bytes)
        del statistics
    return scores, batches_seen, peak


def _synflow_statistics(model, group, adapter_name, accumulation_dtype, statistics) -> int:
    """SynFlow's dR/dW on the linearised network, for the layers of ``group``; returns the probes' bytes.

    Linearised as in Tanaka et al. (2020): every parameter of the model replaced by its absolute value, dropout off,
    an all-ones input (``inputs_embeds``, one token), R = the sum of the outputs. Afterwards every parameter gets
    its sign back (``p[negative] *= -1`` is exact) and the model its train/eval mode. Numerical safety: with all
    weights positive the activations of a plain deep chain grow like the product of the layers' norms, but the
    pre-norm transformers this package targets re-normalise the residual stream in every block (RMSNorm /
    LayerNorm), so R stays finite in fp32; scores are only ranked, never used as magnitudes. A LayerNorm that sees
    the constant all-ones vector outputs its bias alone (the mean is subtracted), so for post-norm encoders the
    signal reaching deeper layers is weak: prefer another metric there.
    """
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    embeddings = root.get_input_embeddings()
    if embeddings is None:
        raise ValueError("select_mask: selection='synflow' needs a model that accepts inputs_embeds")
    if any(type(p).__name__ == "Params4bit" for p in root.parameters()):
        # |W| of a packed 4-bit weight is not a 4-bit weight of the same quantisation (NF4/FP4 codes are not
        # symmetric bit patterns we could flip in place), so the network cannot be linearised exactly.
        raise ValueError(
            "select_mask: selection='synflow' cannot linearise a model with 4-bit (Params4bit) weights; choose a "
            "data-aware metric such as 'gradient', or run SynFlow on the unquantised model"
        )
    parameters = [p for p in root.parameters()]
    signs = [p.detach() < 0 for p in parameters]
    was_training = root.training
    was_trainable = []
    try:
        with torch.no_grad():
            for p in parameters:
                p.abs_()
        root.eval()
        for _, layer in group:
            layer.salience_probe = GradientProbe(layer.logical_shape, accumulation_dtype, layer.weight_device)
            values = layer.sparse_values[adapter_name]
            was_trainable.append(values.requires_grad)
            values.requires_grad_(True)
        weight = embeddings.weight
        ones = torch.ones((1, 1, weight.shape[1]), dtype=weight.dtype, device=weight.device)
        outputs = model(inputs_embeds=ones)
        result = outputs.logits if getattr(outputs, "logits", None) is not None else outputs[0]
        values = [layer.sparse_values[adapter_name] for _, layer in group]
        _probe_backward(model, result.float().sum(), values)
        probe_bytes = sum(layer.salience_probe.nbytes for _, layer in group)
        for stats, (_, layer) in zip(statistics, group):
            stats["grad"] = layer.salience_probe.grad
            stats["linearised_weight"] = _effective_weight(layer, adapter_name).abs()
    finally:
        for (_, layer), trainable in zip(group, was_trainable):
            layer.salience_probe = None
            layer.sparse_values[adapter_name].requires_grad_(trainable)
        with torch.no_grad():
            for p, negative in zip(parameters, signs):
                p[negative] *= -1
        root.train(was_training)
    return probe_bytes


def _hessian_grad_pass(model, group, adapter_name, data, num_batches, loss_fn, statistics) -> None:
    """GRaSP: H G by a finite difference of gradients, (G(W + eps G) - G(W)) / eps, one more pass over the data."""
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
    _run_passes(model, group, adapter_name, data, num_batches, loss_fn, "salience (grasp, perturbed)")
    for stats, (_, layer) in zip(statistics, group):
        probe = layer.salience_probe
        stats["hessian_grad"] = (probe.grad - stats["grad"]) / step
        probe.weight_offset = None
