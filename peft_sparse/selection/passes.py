"""The passes that measure salience: forward + backward over batches while every sparse layer's
:class:`~peft_sparse.selection.salience.GradientProbe` collects its dense weight gradient (and the square, for
Fisher), GRaSP's second, perturbed pass, and the scoring of each layer's entries by the config's metric.
SynFlow's data-free pass lives in :mod:`peft_sparse.selection.synflow`."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch
from accelerate.utils import send_to_device
from tqdm.auto import tqdm

from .._distributed import is_sharded, world_size
from ..ops import scatter_add
from ..tuner.indices import layer_seed
from .salience import GradientProbe
from .synflow import synflow_statistics

__all__ = ["compute_scores", "effective_weight", "probe_backward", "run_passes"]

# GRaSP's Hessian-vector product is (grad(W + eps G) - grad(W)) / eps with eps = this * ||W|| / ||G||: small enough
# for the first-order difference to be accurate, large enough to stay clear of fp32 cancellation.
GRASP_RELATIVE_STEP = 1e-3


def run_passes(model, layers, adapter_name, data, num_batches, loss_fn, description) -> int:
    """Forward + backward over up to ``num_batches`` batches; the layers' probes collect the dense gradients."""
    values = [layer.sparse_values[adapter_name] for _, layer in layers]
    device = values[0].device
    seen = 0
    total = min(num_batches, len(data)) if hasattr(data, "__len__") else num_batches
    for batch in tqdm(itertools.islice(iter(data), num_batches), total=total, desc=description, leave=False):
        batch = send_to_device(batch, device)
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
        probe_backward(model, loss, values)
        for _, layer in layers:
            layer.salience_probe.end_batch()
        seen += 1
    if seen == 0:
        raise ValueError("select_mask: `data` yielded no batch")
    _all_reduce_probes(layers)
    return seen


def probe_backward(model, loss: torch.Tensor, values: list[torch.Tensor]) -> None:
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


def effective_weight(layer, adapter_name: str) -> torch.Tensor:
    """fp32 ``W0 + delta``: the weight the layer computes with (its trained delta folded in)."""
    weight = layer.dequantized_weight(torch.float32)
    return scatter_add(weight, *layer.adapter_delta(adapter_name, detach=True))


def compute_scores(
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
        statistics = [{} for _ in group]
        probe_bytes = 0
        if metric.name == "synflow":
            probe_bytes = synflow_statistics(model, group, adapter_name, accumulation_dtype, statistics)
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
                batches_seen = run_passes(model, group, adapter_name, data, num_batches, loss_fn, description)
                if metric.needs_hessian:
                    hessian_grad_pass(model, group, adapter_name, data, num_batches, loss_fn, statistics)
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
            weight = effective_weight(layer, adapter_name) if weight is None else weight
            stats = {key: value.float() for key, value in stats.items() if value is not None}
            score = metric.score(weight=weight, generator=generator, **stats).float()
            scores.append(score)
            held += score.numel() * score.element_size()
        peak = max(peak, held + probe_bytes)
        del statistics
    return scores, batches_seen, peak


def hessian_grad_pass(model, group, adapter_name, data, num_batches, loss_fn, statistics) -> None:
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
    run_passes(model, group, adapter_name, data, num_batches, loss_fn, "salience (grasp, perturbed)")
    for stats, (_, layer) in zip(statistics, group):
        probe = layer.salience_probe
        stats["hessian_grad"] = (probe.grad - stats["grad"]) / step
        probe.weight_offset = None
