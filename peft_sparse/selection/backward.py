"""The backward that feeds the salience probes, and the weight a layer computes with: shared by the salience passes
(:mod:`peft_sparse.selection.passes`) and SynFlow's data-free pass (:mod:`peft_sparse.selection.synflow`)."""

from __future__ import annotations

import torch

from .._distributed import is_sharded
from ..ops import scatter_add

__all__ = ["effective_weight", "probe_backward"]


def probe_backward(model, loss: torch.Tensor, values: list[torch.Tensor], replays_forward: bool = False) -> None:
    """Run the backward that feeds the layers' salience probes, leaving every parameter's ``.grad`` as it was, so
    that selection leaves no trace in an optimizer's view of the model.

    On one process or under DDP, ``autograd.grad`` with respect to the values does that. Two setups need a regular
    ``backward`` instead, after which the gradients it left are put back to what they were:

    * FSDP2: the forward computes with unsharded copies of the parameters, so the sharded values are not in the
      graph: ``autograd.grad`` would run nothing (and the probes would see no gradient, i.e. the mask would be
      chosen by tie-breaks). FSDP reduce-scatters the gradients into the sharded ``.grad``.
    * Reentrant activation checkpointing (``replays_forward``: a probed layer's forward ran with autograd off): the
      checkpoint runs its block under ``no_grad`` and its backward node replays the block and back-propagates
      through it with ``torch.autograd.backward``. The values used inside the block are not inputs of that node,
      so ``autograd.grad`` with respect to them prunes it (the block's probes would see nothing, silently), and the
      node refuses to run under ``autograd.grad`` anyway.
    """
    if not replays_forward and not any(is_sharded(v) for v in values):
        torch.autograd.grad(loss, values, allow_unused=True)
        return
    parameters = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in parameters]
    for p in parameters:
        p.grad = None
    try:
        loss.backward()
    finally:
        for p, grad in zip(parameters, saved):
            p.grad = grad


def effective_weight(layer, adapter_name: str) -> torch.Tensor:
    """fp32 ``W0 + delta``: the weight the layer computes with (its trained delta folded in)."""
    weight = layer.dequantized_weight(torch.float32)
    return scatter_add(weight, *layer.adapter_delta(adapter_name, detach=True))
