"""The backward that feeds the salience probes, and the weight a layer computes with: shared by the salience passes
(:mod:`peft_sparse.selection.passes`) and SynFlow's data-free pass (:mod:`peft_sparse.selection.synflow`)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .._distributed import is_sharded, world_size
from ..ops import scatter_add

__all__ = ["backward_stops_below", "effective_weight", "probe_backward"]


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


def _checkpointed_blocks() -> tuple[type, ...]:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers without the shared checkpointed-layer class
        return ()
    return (GradientCheckpointingLayer,)


@contextmanager
def backward_stops_below(model: nn.Module, layers) -> None:
    """Within the block, each forward of ``model`` detaches the input of the lowest decoder block holding one of
    ``layers`` (a new leaf that requires grad), so that a full ``loss.backward()`` stops there.

    Why: :func:`probe_backward` must run a full ``loss.backward()`` under reentrant checkpointing, and the QLoRA
    recipe's ``enable_input_require_grads`` makes the embeddings' output require grad, so that backward replays and
    back-propagates every block down to the embeddings, for every layer group's pass: G groups cost G training steps
    per batch. Nothing below the group's lowest block needs a gradient (the base is frozen, and only the group's
    probes are read), so cutting the graph there leaves the probes' gradients exactly as they were and the cost at
    about ``(5 G + 3) / 8`` steps per batch (a forward each, the replay and backward of the blocks above the cut),
    as ``autograd.grad`` already prunes it without reentrant checkpointing.

    It applies only where it is safe to reason about: one process (under DDP and FSDP other ranks' reducers and
    hooks expect every block's backward), every one of ``layers`` inside transformers' checkpointed decoder blocks
    (``GradientCheckpointingLayer``) of one ``nn.ModuleList`` (run in list order), and only the block's first call
    in each forward (a block that is run again, with shared weights, keeps its graph above the first call). The
    lowest block's hidden states must be its first positional argument (transformers passes them so under reentrant
    checkpointing) and require grad (an input that does not is cut already, and selection refuses where that leaves
    a layer without gradient); otherwise nothing is cut. Elsewhere this does nothing: the backward stays full
    (slower, same result)."""
    block = _lowest_block(model, layers) if world_size() == 1 else None
    if block is None:
        yield
        return
    first_call = [True]

    def detach_input(module, args, kwargs):
        if not first_call[0]:
            return None
        first_call[0] = False
        # Only an input that requires grad: one that does not is already cut (and selection says so when that
        # leaves a layer without gradient), and a leaf that required grad would hide it.
        if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        return None

    def new_forward(module, args, kwargs):
        first_call[0] = True

    starts = model.register_forward_pre_hook(new_forward, with_kwargs=True)
    cut = block.register_forward_pre_hook(detach_input, with_kwargs=True)
    try:
        yield
    finally:
        starts.remove()
        cut.remove()


def _lowest_block(model: nn.Module, layers) -> nn.Module | None:
    """The lowest checkpointed block holding one of ``layers`` (see :func:`backward_stops_below`), or ``None`` where
    the graph is left whole: no such blocks, a layer outside them, blocks in several lists, or the lowest block
    the first of its list (nothing below it but the embeddings)."""
    kinds = _checkpointed_blocks()
    if not kinds:
        return None
    lists = [module for module in model.modules() if isinstance(module, nn.ModuleList)]
    positions = {}  # id(block) -> (id(list), index)
    for blocks in lists:
        for index, block in enumerate(blocks):
            if isinstance(block, kinds):
                positions.setdefault(id(block), (id(blocks), index, block))
    wanted = {id(layer) for _, layer in layers}
    found, lowest = set(), {}
    for list_id, index, block in positions.values():
        inside = {id(module) for module in block.modules()} & wanted
        if inside:
            found |= inside
            lowest[list_id] = min(lowest.get(list_id, (index, block)), (index, block), key=lambda pair: pair[0])
    if found != wanted or len(lowest) != 1:
        return None
    index, block = next(iter(lowest.values()))
    return block if index > 0 else None


def effective_weight(layer, adapter_name: str) -> torch.Tensor:
    """fp32 ``W0 + delta``: the weight the layer computes with (its trained delta folded in)."""
    weight = layer.dequantized_weight(torch.float32)
    return scatter_add(weight, *layer.adapter_delta(adapter_name, detach=True))
