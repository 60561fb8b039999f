"""The forward and backward that feed the salience probes (the model's outputs without a cache, the loss's checks,
the backward that leaves ``.grad`` as it was, where it may stop, which decoder blocks hold the layers) and the weight
a layer computes with: shared by the salience passes (:mod:`peft_sparse.selection.passes`), block replay
(:mod:`peft_sparse.selection.replay`) and SynFlow's data-free pass (:mod:`peft_sparse.selection.synflow`)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from contextlib import contextmanager

import torch
from accelerate.utils import send_to_device
from torch import nn

from .._distributed import is_sharded, world_size
from ..ops import scatter_add

__all__ = [
    "CUT_FROM_GRAPH",
    "backward_stops_below",
    "check_loss",
    "decoder_blocks",
    "effective_weight",
    "model_outputs",
    "probe_backward",
    "restore_gradients",
    "salience_loss",
]


# How a layer that computes the loss can be missing from its autograd graph, and what to do about it (selection's
# refusal and the training callback's first-step warning both say it).
CUT_FROM_GRAPH = (
    "With reentrant gradient checkpointing (use_reentrant=True, as peft's prepare_model_for_kbit_training turns it "
    "on), a checkpointed block whose inputs do not require grad is cut from the graph, and training would not reach "
    "its values either: call model.enable_input_require_grads() and pass input_ids rather than inputs_embeds, or "
    "enable checkpointing with gradient_checkpointing_kwargs={'use_reentrant': False}"
)


def salience_loss(model, batch, device, loss_fn, seen: int) -> torch.Tensor:
    """The loss of salience batch ``seen`` (0-based): the batch moved to ``device``, the model's outputs without a
    cache (:func:`model_outputs`), ``loss_fn(outputs, batch)`` or the outputs' own loss, refused where it is missing,
    not finite or cut from autograd (:func:`check_loss`)."""
    batch = send_to_device(batch, device)
    outputs = model_outputs(model, batch)
    loss = loss_fn(outputs, batch) if loss_fn is not None else outputs.loss
    check_loss(loss, seen)
    return loss


def model_outputs(model, batch):
    """The model's outputs on a salience batch, told not to build a key/value cache where its forward takes
    ``use_cache`` and the batch does not set it: salience never generates, a cache is memory, and a decoder block
    given one cannot be replayed (:mod:`.replay`)."""
    if not isinstance(batch, Mapping):
        return model(batch)
    if "use_cache" not in batch:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        try:
            takes = "use_cache" in inspect.signature(base.forward).parameters
        except (TypeError, ValueError):
            takes = False
        if takes:
            batch = {**batch, "use_cache": False}
    return model(**batch)


def check_loss(loss, seen: int) -> None:
    """Refuse a salience batch's loss that is missing, not finite, or cut from autograd (``seen``: its 0-based
    number)."""
    if loss is None:
        raise ValueError("select_mask: the model returned no loss; pass labels in the batches or a loss_fn")
    if not bool(torch.isfinite(loss.detach()).all()):
        # Non-finite gradients would rank entries by NaN/inf, i.e. by tie-breaking: a mask chosen at random that
        # claims to be salient.
        raise ValueError(
            f"select_mask: the loss of salience batch {seen} (0-based) is {loss.detach().float().tolist()}; "
            "salience needs finite losses (check the batch's inputs and labels, or the model's dtype)"
        )
    if not loss.requires_grad:
        raise ValueError(
            f"select_mask: the loss of salience batch {seen} (0-based) does not require grad, so no gradient can "
            f"reach the sparse layers (selection under torch.no_grad()?). {CUT_FROM_GRAPH}"
        )


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
    with restore_gradients(model):
        loss.backward()


@contextmanager
def restore_gradients(model):
    """Within the block a backward may fill ``.grad``; afterwards every trainable parameter's ``.grad`` is what it
    was before (the same tensor object, or ``None``)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in parameters]
    for p in parameters:
        p.grad = None
    try:
        yield
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
    about ``(2G + 2) / 3`` frozen-base steps per batch (a forward each, the replay and backward of the blocks above
    the cut, the group's weight gradients), as ``autograd.grad`` already prunes it without reentrant checkpointing.

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


def decoder_blocks(model: nn.Module, layers) -> tuple[nn.ModuleList, list[tuple[int, int]]] | None:
    """The ``nn.ModuleList`` of transformers' checkpointed decoder blocks (``GradientCheckpointingLayer``) that
    holds every one of ``layers``, and for each layer the first and last index of the blocks holding it (the same
    block, unless blocks share modules); ``None`` where there are no such blocks, a layer lies outside them, or they
    are spread over several lists."""
    kinds = _checkpointed_blocks()
    if not kinds:
        return None
    spans: dict[int, tuple[int, int]] = {}  # id(layer) -> (first, last) block index
    holder = None
    wanted = {id(layer) for _, layer in layers}
    for blocks in (module for module in model.modules() if isinstance(module, nn.ModuleList)):
        for index, block in enumerate(blocks):
            if not isinstance(block, kinds):
                continue
            for module in block.modules():
                if id(module) in wanted:
                    if holder is not None and holder is not blocks:
                        return None
                    holder = blocks
                    first, last = spans.get(id(module), (index, index))
                    spans[id(module)] = (min(first, index), max(last, index))
    if holder is None or len(spans) != len(wanted):
        return None
    return holder, [spans[id(layer)] for _, layer in layers]


def _lowest_block(model: nn.Module, layers) -> nn.Module | None:
    """The lowest checkpointed block holding one of ``layers`` (see :func:`backward_stops_below`), or ``None`` where
    the graph is left whole: no such blocks (:func:`decoder_blocks`), or the lowest block the first of its list
    (nothing below it but the embeddings)."""
    found = decoder_blocks(model, layers)
    if found is None:
        return None
    blocks, spans = found
    lowest = min(first for first, _ in spans)
    return blocks[lowest] if lowest > 0 else None


def effective_weight(layer, adapter_name: str) -> torch.Tensor:
    """fp32 ``W0 + delta``: the weight the layer computes with (its trained delta folded in)."""
    weight = layer.dequantized_weight(torch.float32)
    return scatter_add(weight, *layer.adapter_delta(adapter_name, detach=True))
