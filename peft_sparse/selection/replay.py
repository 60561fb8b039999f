"""Layer groups scored from recorded decoder-block boundaries: selection in several groups for about the time of two
passes, whatever the number of groups.

When memory holds the accumulators of only some layers at a time, the layers are scored in groups, and every group
used to need a pass of its own over the salience batches: a whole forward and a backward down to the group, about
``(2G + 2) / 3`` frozen-base training steps per batch for ``G`` groups (a salience pass also forms the dense weight
gradients; 19 groups for Llama-3-70B in NF4 on an 80 GB GPU). But
with the base frozen and the adapter's values fixed, the hidden state entering a decoder block and the gradient of
the loss at a block's output are the same whichever layers are being probed. So one recording pass keeps, per batch,
the input of each group's lowest block and the gradient at the output of its top block (on the host), and each group
is then scored by running only its own blocks from that input and back-propagating that gradient: the group's layers
see exactly the output gradients and inputs a whole pass would give them. Cost: the recording pass (a forward and a
backward, no probes: a training step) plus one forward and backward of every block, with the weight gradients, over
all groups (4/3 of a step): about 7/3 training steps per batch, whatever the number of groups.

It applies where it can be checked: one process; every probed layer inside transformers' checkpointed decoder
blocks (``GradientCheckpointingLayer``) of one ``nn.ModuleList``, each block called once per forward with the hidden
state as its first positional argument, which is the previous block's output, and keyword arguments that are tensors
or plain values (no cache object, which a replay would write to again). Under gradient checkpointing that takes
transformers 5, whose blocks checkpoint ``forward`` and keep module hooks outside the checkpoint (before it, the
checkpoint's replay in the backward ran the blocks' hooks again, and the groups take whole passes). Each group's
replay of the first batch must reproduce the recorded output of its top block before anything is accumulated
(dropout or any other randomness inside the blocks fails that check); where anything does not hold, the group is
scored by a whole pass instead, the same result at the old cost. Memory: ``batches x tokens x hidden x 4`` bytes
per group boundary (a lowest block's input, a top block's output gradient), in host memory (the device's memory when
the model is on the CPU), plus the blocks' keyword tensors (position embeddings, masks). Where that exceeds the host
memory selection may use (``host_limit``), the groups are recorded in rounds: each recording keeps the boundaries of
as many leading groups as fit (projected from its first batch), those groups are replayed, and the next round
records the rest: a training step per batch more for each round.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .._distributed import is_sharded, world_size
from .backward import decoder_blocks, restore_gradients, salience_loss

__all__ = ["Boundaries", "NotReplayable", "group_blocks", "record_boundaries", "replay_group", "replay_passes"]

logger = logging.getLogger(__name__)

# The replayed output of a group's top block on the first batch must match the recorded one to this relative
# tolerance (of its largest magnitude): recomputation on a GPU may differ in the last bits; dropout, a wrong argument
# or a block that does not feed the next differ by far more.
REPLAY_TOLERANCE = 1e-4


class NotReplayable(Exception):
    """The model does not meet what block replay needs (see the module docstring); the groups take whole passes."""


@dataclass
class Boundaries:
    """What the recording pass kept: per batch, the input of each group's lowest block and the loss's gradient at the
    output of its top block (host tensors), every block's other arguments, and the first batch's top-block outputs
    (to check each replay against)."""

    blocks: nn.ModuleList
    ranges: list[range]  # per layer group this recording covers (the first ones asked for): the blocks it replays
    inputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    grads: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    calls: list[dict[int, tuple]] = field(default_factory=list)
    first_outputs: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        tensors = [t for store in (self.inputs, self.grads) for per_batch in store.values() for t in per_batch]
        tensors += list(self.first_outputs.values())
        return sum(t.numel() * t.element_size() for t in tensors)


_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _replayable_value(value) -> bool:
    if isinstance(value, (torch.Tensor, *_PLAIN)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_replayable_value(item) for item in value)
    return False


def _host(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True)


def _hidden_state(output):
    """A decoder block's hidden-state output (transformers' blocks return it alone or first in a tuple)."""
    return output[0] if isinstance(output, tuple) else output


class _Recorder:
    """Forward hooks on every decoder block that keep, for the batch being recorded, what :class:`Boundaries`
    holds, and check the structure block replay relies on (raising :class:`NotReplayable` where it fails)."""

    def __init__(self, boundaries: Boundaries, host_limit: int | None = None, batch_scale: float = 1.0) -> None:
        self.boundaries, self.host_limit, self.batch_scale = boundaries, host_limit, batch_scale
        self._keep(len(boundaries.ranges))
        for index in self.starts:
            boundaries.inputs[index] = []
        for index in self.tops:
            boundaries.grads[index] = []
        self.seen, self.calls, self.outputs = 0, {}, {}

    def _keep(self, groups: int) -> None:
        """Record the boundaries of the first ``groups`` groups only (dropping what was kept of the others)."""
        boundaries = self.boundaries
        del boundaries.ranges[groups:]
        self.starts = {span.start for span in boundaries.ranges}
        self.tops = {span.stop - 1 for span in boundaries.ranges}
        for store, kept in ((boundaries.inputs, self.starts), (boundaries.grads, self.tops)):
            for index in set(store) - kept:
                del store[index]
        for index in set(boundaries.first_outputs) - self.tops:
            del boundaries.first_outputs[index]

    def _fit_host_limit(self) -> None:
        """After the first batch: keep the leading groups whose boundaries, projected over every batch, fit the host
        limit (at least one, else :class:`NotReplayable`); the caller records the others in a later round."""
        boundaries, limit, scale = self.boundaries, self.host_limit, self.batch_scale
        counted, projected = set(), 0.0
        for kept, span in enumerate(boundaries.ranges):
            for key in (("in", span.start), ("grad", span.stop - 1)):
                if key not in counted:
                    counted.add(key)
                    store = boundaries.inputs if key[0] == "in" else boundaries.grads
                    projected += store[key[1]][0].nbytes * scale
                    if key[0] == "grad":
                        projected += boundaries.first_outputs[key[1]].nbytes
            if projected > limit:
                if kept == 0:
                    raise NotReplayable(
                        f"one layer group's block boundaries would take {projected / 2**30:.2f} GiB of host memory, "
                        f"more than the {limit / 2**30:.2f} GiB selection may use there"
                    )
                self._keep(kept)
                return

    def start_batch(self, seen: int) -> None:
        self.seen, self.calls, self.outputs = seen, {}, {}

    def before(self, index: int, args, kwargs) -> None:
        if index in self.calls:
            raise NotReplayable(f"decoder block {index} ran twice in one forward")
        if not args or not isinstance(args[0], torch.Tensor):
            raise NotReplayable(f"decoder block {index} was not given its hidden state positionally")
        if index > 0 and self.outputs.get(index - 1) is not args[0]:
            raise NotReplayable(f"decoder block {index}'s input is not block {index - 1}'s output")
        if not all(_replayable_value(v) for v in (*args[1:], *kwargs.values())):
            raise NotReplayable(f"decoder block {index} takes an argument a replay cannot repeat (a cache?)")
        self.calls[index] = (args[1:], dict(kwargs))
        if index in self.starts:
            self.boundaries.inputs[index].append(_host(args[0]))

    def after(self, index: int, output) -> None:
        hidden = _hidden_state(output)
        if not isinstance(hidden, torch.Tensor):
            raise NotReplayable(f"decoder block {index} returned no hidden-state tensor")
        self.outputs[index] = hidden
        if index in self.tops:
            if not hidden.requires_grad:
                raise NotReplayable(f"decoder block {index}'s output does not require grad")
            if self.seen == 0:
                self.boundaries.first_outputs[index] = _host(hidden)
            grads = self.boundaries.grads[index]
            hidden.register_hook(lambda grad: grads.append(_host(grad)))

    def end_batch(self) -> None:
        blocks = len(self.boundaries.blocks)
        got_gradients = all(len(self.boundaries.grads[index]) == self.seen + 1 for index in self.tops)
        if set(self.calls) != set(range(blocks)) or not got_gradients:
            raise NotReplayable("a decoder block did not run, or its output got no gradient, in the recording")
        self.boundaries.calls.append(self.calls)
        self.outputs = {}
        if self.seen == 0 and self.host_limit is not None:
            self._fit_host_limit()

    def install(self) -> list:
        hooks = []
        for index, block in enumerate(self.boundaries.blocks):
            hooks.append(
                block.register_forward_pre_hook(
                    lambda module, args, kwargs, index=index: self.before(index, args, kwargs), with_kwargs=True
                )
            )
            hooks.append(
                block.register_forward_hook(lambda module, args, output, index=index: self.after(index, output))
            )
        return hooks


def _batch_scale(batches) -> float:
    """Every batch's size over the first's (in tokens where the batches are dicts with ``input_ids``, else one
    each): what the first batch's boundaries are multiplied by to project the whole recording."""
    sizes = [b["input_ids"].numel() if isinstance(b, dict) and "input_ids" in b else None for b in batches]
    if not sizes or None in sizes or sizes[0] == 0:
        return float(len(sizes))
    return sum(sizes) / sizes[0]


def group_blocks(model, layers, groups: list[range]) -> tuple[nn.ModuleList, list[range]] | None:
    """The decoder blocks holding ``layers`` and, per layer group (ranges of positions in ``layers``), the blocks
    its replay runs: from the lowest block holding one of its layers to the highest. ``None`` where the layers are
    not all in one list of checkpointed blocks (:func:`~.backward.decoder_blocks`). A block split between groups is
    in the range of each."""
    found = decoder_blocks(model, layers)
    if found is None:
        return None
    blocks, spans = found
    return blocks, [range(min(spans[i][0] for i in group), max(spans[i][1] for i in group) + 1) for group in groups]


def replay_passes(replayed_blocks: int, blocks: int, num_batches: int) -> int:
    """The groups' replays in whole-model forward+backward passes, rounded up: ``replayed_blocks`` block runs per
    batch (a block split between groups once per group) over ``num_batches``, in a model of ``blocks`` blocks."""
    return -(-replayed_blocks * num_batches // max(blocks, 1))


def record_boundaries(
    model, layers, groups: list[range], batches, loss_fn, values, host_limit: int | None = None
) -> Boundaries | None:
    """The recording pass over ``batches`` (see the module docstring), or ``None`` where block replay does not
    apply (the caller then scores each group by a whole pass). ``groups``: the layer groups, as ranges of positions
    in ``layers``; ``values``: the layers' values (their device is the batches'). ``host_limit``: the bytes the
    recording may keep; after the first batch it keeps only the leading groups whose boundaries fit, projected over
    every batch (``len(result.ranges)`` of them: the caller records the rest in another round), and gives ``None``
    where not even one group's fit."""
    if world_size() != 1 or any(is_sharded(v) for v in values):
        return None
    found = group_blocks(model, layers, groups)
    if found is None:
        return None
    boundaries = Boundaries(*found)
    recorder = _Recorder(boundaries, host_limit, _batch_scale(batches))
    device = values[0].device
    hooks = recorder.install()
    try:
        for seen, batch in enumerate(tqdm(batches, desc="salience: recording block boundaries", leave=False)):
            recorder.start_batch(seen)
            loss = salience_loss(model, batch, device, loss_fn, seen)
            with restore_gradients(model):
                loss.backward()
            del loss
            recorder.end_batch()
    except NotReplayable as why:
        logger.info("select_mask: the layer groups take whole passes: %s", why)
        return None
    finally:
        for hook in hooks:
            hook.remove()
    return boundaries


def replay_group(boundaries: Boundaries, group: int, probes, model, device: torch.device) -> None:
    """Score layer group ``group``: for every batch, run its blocks from the recorded input and back-propagate the
    recorded gradient at its top, while the group's probes accumulate. Raises :class:`NotReplayable` (before any
    accumulation) where the first batch's replay does not reproduce the recorded output."""
    blocks = boundaries.blocks
    span = boundaries.ranges[group]
    for seen, calls in enumerate(boundaries.calls):
        hidden = boundaries.inputs[span.start][seen].to(device).detach().requires_grad_(True)
        for index in span:
            rest, kwargs = calls[index]
            hidden = _hidden_state(blocks[index](hidden, *rest, **kwargs))
        if seen == 0:
            recorded = boundaries.first_outputs[span.stop - 1]
            replayed = hidden.detach().to(recorded.device, recorded.dtype)
            scale = float(recorded.abs().max()) if recorded.numel() else 0.0
            differs = replayed.shape != recorded.shape or float((replayed - recorded).abs().max()) > (
                REPLAY_TOLERANCE * max(scale, 1e-30)
            )
            if differs:
                raise NotReplayable(
                    f"the replay of decoder blocks {span.start}-{span.stop - 1} differs from its recording"
                )
        grad = boundaries.grads[span.stop - 1][seen].to(device)
        with restore_gradients(model):
            torch.autograd.backward(hidden, grad)
        for probe in probes:
            probe.end_batch()
