"""``SparseTrainingCallback``: mask selection and mask updates inside ``transformers.Trainer`` and TRL's ``SFTTrainer``
(usage: README.md, "With TRL's SFTTrainer").

What it does, by the adapter's :class:`~peft_sparse.SparseConfig`:

* **Train begin**: if the mask is still the seeded random placeholder (never chosen by ``select_mask``, never
  loaded from a saved adapter), the run is not a resumed one, and ``selection`` is not ``"random"``, it runs
  :func:`~peft_sparse.select_mask` on ``data`` or, by default, on the trainer's train dataloader
  (``salience_batches`` batches). The Trainer has already built its optimizer (and, under DDP, wrapped the model)
  by then; ``select_mask`` resizes the values parameters in place, so the optimizer still holds them. Under DDP
  the layers keep the sizes allocated at injection instead (``keep_layer_sizes=True``: DDP's gradient buckets are
  laid out for them). Either way every rank selects the same entries (salience is summed over ranks).
* **Every optimizer step** (``on_step_end``: gradient accumulation's micro-batches do not count): with
  ``update="dynamic"``, :func:`~peft_sparse.update_mask` every ``update_interval`` steps; with ``update="spiel"``,
  :class:`~peft_sparse.SpIEL` prune-and-regrow, using the optimizer the Trainer passes to callbacks.
* **Logging**: each selection or update appends ``sparse/...`` figures (entries moved, seconds) to the Trainer's
  ``state.log_history`` and to this module's logger.
* **Checkpoints**: indices, values and residuals are in the saved adapter and the optimizer moments in the
  Trainer's optimizer checkpoint; SpIEL's own state (growth records, an open gradient-accumulation window) is saved
  as ``sparse_training_state.pt`` in each ``checkpoint-N`` folder and read back when ``trainer.train(
  resume_from_checkpoint=...)`` resumes from ``output_dir/checkpoint-N``.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ._distributed import rank, world_size
from .selection.backward import CUT_FROM_GRAPH
from .selection.reassign import unwrap_optimizer
from .selection.select import select_mask, update_mask
from .selection.spiel import SpIEL
from .tuner.lookup import resolve_adapter, sparse_layers

__all__ = ["SparseTrainingCallback"]

logger = logging.getLogger(__name__)
STATE_FILE = "sparse_training_state.pt"


class SparseTrainingCallback(TrainerCallback):
    """Runs peft-sparse mask selection and updates inside a ``transformers.Trainer`` / TRL ``SFTTrainer``.

    Args:
        data: batches for salience (an iterable of dicts the model accepts, with labels); default: the trainer's
            train dataloader.
        adapter_name: the sparse adapter (default: the active one).
        loss_fn: ``loss_fn(outputs, batch) -> loss`` for salience; default ``outputs.loss``.
    """

    def __init__(
        self,
        data: Iterable | None = None,
        *,
        adapter_name: str | None = None,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    ) -> None:
        self.data = data
        self.adapter_name = adapter_name
        self.loss_fn = loss_fn
        self.spiel: SpIEL | None = None
        self._train_dataloader = None
        self._gradients_checked = False

    # --- helpers -------------------------------------------------------------------------------------------------
    def _config(self, model):
        _, adapter_name, config = resolve_adapter(model, self.adapter_name, "SparseTrainingCallback")
        return adapter_name, config

    def _batches(self):
        data = self.data if self.data is not None else self._train_dataloader
        if data is None:
            raise ValueError("SparseTrainingCallback: no data for salience; pass data=... or train with a dataloader")
        return data

    @staticmethod
    def _record(state, logs: dict[str, float]) -> None:
        logger.info("peft-sparse: %s", ", ".join(f"{k}={v:.4g}" for k, v in logs.items()))
        state.log_history.append({**logs, "step": state.global_step})

    # --- events --------------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        self._train_dataloader = train_dataloader
        adapter_name, config = self._config(model)
        self.adapter_name = adapter_name
        layers = [layer for _, layer in sparse_layers(model, adapter_name)]
        never_chosen = not any(adapter_name in layer.mask_chosen for layer in layers)
        selects = state.global_step == 0 and never_chosen and config.selection != "random"
        stage = _deepspeed_zero_stage(optimizer)
        if stage is not None:
            _refuse_what_deepspeed_cannot_run(config, stage, layers, adapter_name, selects)
        else:
            _check_optimizer_holds_values(optimizer, layers, adapter_name)
        if selects:
            self._select(model, optimizer, state, layers, adapter_name)
        if config.update == "spiel":
            self.spiel = SpIEL(
                model,
                optimizer,
                num_training_steps=state.max_steps,
                adapter_name=adapter_name,
                start_step=state.global_step,
            )
            if state.global_step > 0:
                self._restore(args, state)
        return control

    def _select(self, model, optimizer, state, layers, adapter_name) -> None:
        # select_mask resizes the values parameters in place, so the optimizer the Trainer built holds them still.
        # Salience is measured in training mode, the mode the Trainer puts the model in at its first step (at
        # train begin a model fresh from from_pretrained is still in eval mode). Besides dropout, that matters for
        # bitsandbytes: on AVX512-BF16 CPUs its eval-mode 4-bit forward repacks the weights in place (lossily),
        # which under FSDP also disagrees with the sharded copy.
        model.train()
        report = select_mask(
            model, self._batches(), loss_fn=self.loss_fn, adapter_name=adapter_name, keep_layer_sizes=world_size() > 1
        )
        _match_optimizer_to_entries(optimizer, layers, adapter_name)
        self._record(state, {"sparse/selected_entries": float(report.total), **report.log_entries("selection")})

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not self._gradients_checked and model is not None:
            self._gradients_checked = True
            adapter_name, _ = self._config(model)
            _warn_about_layers_without_gradient(sparse_layers(model, adapter_name), adapter_name)
        return control

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        adapter_name, config = self._config(model)
        if config.update == "spiel" and self.spiel is not None:
            self.spiel.completed_steps = state.global_step - 1
            report = self.spiel.step()
            if report is not None:
                self._record(
                    state,
                    {
                        "sparse/regrown": float(report.total),
                        "sparse/prune_fraction": report.fraction,
                        "sparse/update_seconds": report.seconds,
                    },
                )
        elif (
            config.update == "dynamic"
            and state.global_step % config.update_interval == 0
            and state.global_step < state.max_steps
        ):
            if self.data is None:
                _align_epoch(self._batches(), state)
            report = update_mask(
                model, self._batches(), optimizer=optimizer, loss_fn=self.loss_fn, adapter_name=adapter_name
            )
            self._record(state, {"sparse/moved": float(report.total), **report.log_entries("update")})
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.spiel is None or rank() != 0:
            return control
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            torch.save(self.spiel.state_dict(), os.path.join(folder, STATE_FILE))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.spiel is not None:
            self.spiel.close()
        return control

    def _restore(self, args, state) -> None:
        path = os.path.join(_checkpoint_resumed_from(args, state), STATE_FILE)
        if not os.path.isfile(path):
            logger.warning(
                "peft-sparse: resuming at step %d without %s; SpIEL restarts its growth records (all entries count "
                "their movement from their current values) and any open gradient-accumulation window",
                state.global_step,
                path,
            )
            self.spiel.restart_growth_records()
            return
        self.spiel.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def _align_epoch(loader, state) -> None:
    """Give the Trainer's train dataloader the epoch in progress before a dynamic update draws its first batches.

    The Trainer sets the epoch of the loader it iterates (its shuffled order is seeded by it); when it resumes
    mid-epoch it iterates a copy that skips the batches already trained, and the loader the callbacks hold keeps the
    epoch it was built with. An update drawing from it would then score another epoch's batches than the
    uninterrupted run did (a different mask, silently). ``state.epoch`` is ``epoch + micro-batches done / micro-
    batches per epoch`` at a step's end: the epoch in progress is its ceiling less one."""
    epoch = max(math.ceil(state.epoch or 0) - 1, 0)
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    # as the Trainer does: accelerate's DataLoaderShard does not forward set_epoch to a BatchSamplerShard's sampler
    inner = getattr(getattr(loader, "batch_sampler", None), "batch_sampler", None)
    if hasattr(inner, "set_epoch"):
        inner.set_epoch(epoch)


def _checkpoint_resumed_from(args, state) -> str:
    """The checkpoint folder the Trainer is resuming from. Callbacks are not told it, and a checkpoint need not lie
    under ``args.output_dir`` (a copied or downloaded one, resumed with a new output_dir): it is read from the
    ``resume_from_checkpoint`` argument of the Trainer's training loop on the call stack, falling back to
    ``output_dir/checkpoint-<step>``, where the Trainer saves."""
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_name == "_inner_training_loop":
            folder = frame.f_locals.get("resume_from_checkpoint")
            if isinstance(folder, (str, os.PathLike)):
                return os.fspath(folder)
        frame = frame.f_back
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def _warn_about_layers_without_gradient(layers, adapter_name: str) -> None:
    """Before the first optimizer step: warn when some sparse layers with entries got a gradient and others none.

    The known cause is reentrant gradient checkpointing of blocks whose inputs do not require grad (``inputs_embeds``
    computed by the caller, or a model whose ``enable_input_require_grads`` was not called): the blocks are cut from
    the graph and their entries never train, with no error from torch. A layer the forward does not use gets no
    gradient either, legitimately, so this warns rather than refuses. Where no layer has a ``.grad`` (DeepSpeed ZeRO
    keeps gradients in its own buffers) there is nothing to compare."""
    trainable = [
        (name, layer.sparse_values[adapter_name])
        for name, layer in layers
        if layer.sparse_values[adapter_name].requires_grad and layer.sparse_values[adapter_name].numel()
    ]
    starved = [name for name, values in trainable if values.grad is None]
    if not starved or len(starved) == len(trainable):
        return
    message = (
        f"peft-sparse: {len(starved)} of {len(trainable)} sparse layers with trainable entries got no gradient in "
        f"the first step (e.g. {starved[:3]}), so their entries will not train. {CUT_FROM_GRAPH}"
    )
    logger.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)


def _deepspeed_zero_stage(optimizer) -> int | None:
    """The ZeRO stage (1/2 or 3) when the Trainer's optimizer is a DeepSpeed ZeRO optimizer, else ``None``."""
    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        if type(optimizer).__module__.startswith("deepspeed."):
            return 3 if "Stage3" in type(optimizer).__name__ else 2
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def _refuse_what_deepspeed_cannot_run(config, stage: int, layers, adapter_name: str, selects: bool) -> None:
    """DeepSpeed ZeRO copies every trainable parameter into flat, partitioned buffers (and a float32 master copy)
    when the Trainer wraps the model, before any callback runs. Whatever rewrites values or optimizer state per
    entry after that would act on copies DeepSpeed no longer reads: refuse it here, before a step, instead of
    training something else than the mask says."""
    where = "SparseTrainingCallback under DeepSpeed ZeRO"
    if config.update != "static":
        raise ValueError(
            f"{where}: update={config.update!r} moves entries and their optimizer moments, which ZeRO keeps flattened "
            "and partitioned; train dynamic masks and SpIEL with FSDP2 or DDP, or use update='static'"
        )
    if selects:
        raise ValueError(
            f"{where}: selection={config.selection!r} would choose the mask after DeepSpeed copied the values; choose "
            "it before training: peft_sparse.select_mask(model, trainer.get_train_dataloader()) before "
            "trainer.train() (or selection='random')"
        )
    # ZeRO-3 has already swapped every parameter's data for an empty partition; ds_numel is its real size
    empty = [
        layer.layer_name
        for layer in layers
        if getattr(layer.sparse_values[adapter_name], "ds_numel", layer.sparse_values[adapter_name].numel()) == 0
    ]
    if stage == 3 and empty:
        raise ValueError(
            f"{where}: ZeRO-3 cannot gather a parameter with no elements, and {len(empty)} layer(s) have no entries "
            f"(e.g. {empty[:3]}, left empty by the global budget); use budget='local', ZeRO-2 or FSDP2"
        )


def _match_optimizer_to_entries(optimizer, layers, adapter_name: str) -> None:
    """After a selection at train begin (nothing stepped yet): the optimizer holds exactly the values that have
    entries. A global budget can empty a layer (its values are then frozen, see ``SparseLayer._trainable_once_sized``)
    or give entries to one that had none when the Trainer built the optimizer; membership must follow, because a
    resumed run builds its optimizer from the checkpoint's mask and loads the saved optimizer state by position."""
    optimizer = unwrap_optimizer(optimizer)
    if optimizer is None:
        return
    all_values = [layer.sparse_values[adapter_name] for layer in layers]
    empty = {id(v) for v in all_values if v.numel() == 0}
    held: set[int] = set()
    home = None  # the group new entries join: the one already holding this adapter's values (same lr, decay)
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in empty]
        ids = {id(p) for p in group["params"]}
        held |= ids
        if home is None and any(id(v) in ids for v in all_values):
            home = group
    for values in all_values:
        if values.numel() == 0:
            optimizer.state.pop(values, None)
        elif values.requires_grad and id(values) not in held:
            (home or optimizer.param_groups[0])["params"].append(values)


def _check_optimizer_holds_values(optimizer, layers, adapter_name: str) -> None:
    """An optimizer that does not hold the values parameters (built before they were replaced, e.g. by a
    ``low_cpu_mem_usage`` adapter load) would silently train nothing: say so."""
    if optimizer is None:
        return
    held = {id(p) for group in unwrap_optimizer(optimizer).param_groups for p in group["params"]}
    stale = [
        layer.layer_name
        for layer in layers
        if layer.sparse_values[adapter_name].requires_grad and id(layer.sparse_values[adapter_name]) not in held
    ]
    if stale:
        raise ValueError(
            f"SparseTrainingCallback: the optimizer does not hold the sparse values of {stale[:3]} (it was built "
            "before they were replaced, e.g. by loading an adapter with low_cpu_mem_usage=True); build the optimizer "
            "afterwards"
        )
