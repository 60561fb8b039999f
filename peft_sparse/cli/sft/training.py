"""One ``peft-sparse sft`` run: TRL's ``SFTTrainer`` over a sparse adapter (with
:class:`~peft_sparse.SparseTrainingCallback`) or the LoRA baseline, its record, and the side-by-side step timing of
the saved adapters (the ``--worker timing`` process)."""

from __future__ import annotations

import copy
import math
import statistics
import sys
import time
from pathlib import Path

from ..._memory import reset_peak_memory
from .. import compare, models
from .arguments import PROG, SftError, _one_line, planned_methods
from .data import HeldOutData, run_data
from .evaluation import exact_match
from .model import load_model, lora_config, quantization, resolve_model, sparse_config


def build_trainer(method: str, training_args, model_args, sparse_args, data: HeldOutData):
    """TRL's ``SFTTrainer`` for ``method`` ('sparse': with :class:`~peft_sparse.SparseTrainingCallback`, or 'lora')
    over a freshly loaded base, its own folder ``<output_dir>/<method>`` and learning rate, and the model's source.
    The process's peak-memory count starts after the base is loaded."""
    import torch
    from peft import get_peft_model
    from trl import SFTTrainer

    import peft_sparse

    source = resolve_model(model_args)
    tokenizer = models.load_tokenizer(models.as_folder(source))
    base = load_model(source, model_args)
    reset_peak_memory("cuda" if torch.cuda.is_available() else "cpu")  # loading is not training
    if method == "sparse":
        config = sparse_config(base, model_args, sparse_args, training_args.seed)
        callbacks, lr = [peft_sparse.SparseTrainingCallback()], training_args.learning_rate
    else:
        config, callbacks = lora_config(model_args, sparse_args), None
        lr = sparse_args.compare_learning_rate or training_args.learning_rate
    try:
        model = get_peft_model(base, config)
    except ValueError as err:  # e.g. a budget larger than the targeted layers hold, or targets matching nothing
        raise SftError(f"the {method} adapter: {_one_line(err)}") from None
    args = copy.copy(training_args)
    args.output_dir, args.learning_rate = str(Path(training_args.output_dir) / method), lr
    args.include_num_input_tokens_seen = "non_padding"  # train_tokens counts real tokens, not padding
    try:
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.held_out,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    except ValueError as err:  # TRL's refusals of a configuration (e.g. assistant_only_loss on plain text)
        raise SftError(f"TRL: {_one_line(err)}") from None
    _say_what_was_dropped(trainer, data, args.max_length, method)
    return trainer, source


def _say_what_was_dropped(trainer, data: HeldOutData, max_length: int | None, method: str) -> None:
    """TRL truncates every row to ``max_length`` tokens and drops the rows left with nothing to train on (their
    whole completion cut away). Say how many, in one line, before training; where none is left, refuse (training or
    evaluating on no rows fails deep inside torch or the Trainer)."""
    for split, before, after in (
        ("training", data.train, trainer.train_dataset),
        ("held-out", data.held_out, trainer.eval_dataset),
    ):
        dropped = len(before) - len(after)
        if dropped <= 0:
            continue
        why = (
            f"{dropped} of {len(before)} {split} row(s) were dropped: nothing of their completion is left within "
            f"--max_length {max_length} tokens (TRL truncates each row to it and drops rows with nothing to learn)"
        )
        if len(after) == 0:
            raise SftError(f"{why}; raise --max_length or shorten the prompts")
        print(f"{PROG} ({method}): {why}", file=sys.stderr, flush=True)


def train_one(method: str, script_args, training_args, model_args, sparse_args, data: HeldOutData | None = None):
    """Train ``method`` ('sparse' or 'lora'), save its adapter to ``<output_dir>/<method>/adapter`` and return its
    record (a JSON-able dict) and the trainer (its ``model`` is the trained peft model)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if data is None:
        data = run_data(script_args, training_args, sparse_args)
    trainer, source = build_trainer(method, training_args, model_args, sparse_args, data)
    timer = step_timer(device)
    trainer.add_callback(timer)
    tokenizer, lr = trainer.processing_class, trainer.args.learning_rate
    loss_before = trainer.evaluate()["eval_loss"]
    logged_before = list(trainer.state.log_history)  # train() starts a new state, and log, of its own
    match_before = exact_match(trainer.model, tokenizer, data.held_out)
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    # Training time is the train() call less the evaluations it ran (--eval_strategy); mask selection and updates
    # are part of it.
    eval_seconds = sum(entry.get("eval_runtime", 0.0) for entry in trainer.state.log_history)
    _check_finite(trainer, method, lr)
    last = trainer.state.log_history[-2:]  # with --eval_strategy, the last step's evaluation precedes the summary
    final = next((e for e in last if "eval_loss" in e and e["step"] == trainer.state.global_step), None)
    loss_after = final["eval_loss"] if final else trainer.evaluate()["eval_loss"]
    history = logged_before + trainer.state.log_history
    match_after = exact_match(trainer.model, tokenizer, data.held_out)
    peak = compare.peak_memory_mb(device)

    adapter_dir = Path(trainer.args.output_dir) / "adapter"
    adapter_error = compare.attempt_write(
        f"the {method} adapter",
        adapter_dir,
        lambda: compare.save_adapter(trainer.model, adapter_dir),
        left_behind="what is there is incomplete",
    )
    train_seconds = max(elapsed - eval_seconds, 1e-9)
    tokens = int(trainer.state.num_input_tokens_seen)
    record = {
        "method": method,
        "learning_rate": lr,
        "lora_rank": model_args.lora_r,
        "sparse_r": sparse_args.sparse_r if method == "sparse" else 0,
        "selection": sparse_args.selection if method == "sparse" else "",
        "update": sparse_args.update if method == "sparse" else "",
        "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "eval_loss_before": loss_before,
        "eval_loss_after": loss_after,
        "exact_match_before": match_before[0] if match_before else None,
        "exact_match": match_after[0] if match_after else None,
        "exact_match_rows": match_after[1] if match_after else 0,
        "train_tokens": tokens,
        "train_seconds": train_seconds,
        "step_seconds": timer.seconds,
        "step_seconds_median": timer.median(),
        "steps": trainer.state.global_step,
        "peak_memory_mb": peak,
        "device": device,
        "quantization": quantization(model_args),
        "log_history": history,
        "adapter_dir": None if adapter_error else str(adapter_dir),
        "adapter_error": adapter_error,
        "model": source.description,
        "data": data.description,
        "num_train": len(data.train),
        "num_held_out": len(data.held_out),
    }
    return record, trainer


def step_timer(device: str):
    """A ``TrainerCallback`` that records the wall time of every optimizer step in ``.seconds``, from
    ``on_step_begin`` to ``on_step_end``: forward, backward and optimizer, and a dynamic sparse mask's update at the
    steps that have one. The mask selection before the first step and the evaluations are not in it, so that short
    runs compare their steps, not their set-up. (Defined here so that importing this module does not import
    transformers.)"""
    import torch
    from transformers import TrainerCallback

    def now() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self._start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = now()

        def on_step_end(self, args, state, control, **kwargs):
            if self._start is not None:
                self.seconds.append(now() - self._start)
                self._start = None

        def median(self) -> float | None:
            """The median step time, the first (warm-up) step left out where there are others; None without
            steps."""
            timed = self.seconds[1:] or self.seconds
            return statistics.median(timed) if timed else None

    return StepTimer()


def _check_finite(trainer, method: str, lr: float) -> None:
    """A run whose loss or parameters became inf or nan is refused, unsaved, naming the step."""
    from ..classification import non_finite_parameter

    for entry in trainer.state.log_history:
        if "loss" in entry and not math.isfinite(entry["loss"]):
            raise SftError(
                f"the {method} run: the training loss became {entry['loss']} by step {entry['step']} "
                f"(learning rate {lr:g}); try a lower --learning_rate"
            )
    diverged = non_finite_parameter(trainer.model)
    if diverged is not None:
        raise SftError(
            f"the {method} run: the trained parameter {diverged} holds inf or nan (learning rate {lr:g}); "
            "try a lower --learning_rate"
        )


def time_steps(script_args, training_args, model_args, sparse_args) -> dict:
    """The training step of every saved adapter (``<output_dir>/<method>/adapter``), timed side by side in this one
    process (:func:`~peft_sparse.cli.compare.interleaved_step_times`) on one batch from TRL's own data pipeline,
    with the run's gradient checkpointing and bf16/fp16 autocast. Mask updates and evaluation are not in it."""
    import torch
    from peft import PeftModel
    from trl import SFTTrainer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = run_data(script_args, training_args, sparse_args)
    source = resolve_model(model_args)
    tokenizer = models.load_tokenizer(models.as_folder(source))
    autocast = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else None
    # Every model goes through an SFTTrainer of its own, as in training (it moves the model, sets its config for
    # training, ...), over the first rows only; the first one's first batch is every method's batch.
    rows = data.train.select(range(min(len(data.train), training_args.per_device_train_batch_size)))
    batch, steps = None, {}
    for method in planned_methods(sparse_args):
        adapter = Path(training_args.output_dir) / method / "adapter"
        model = PeftModel.from_pretrained(load_model(source, model_args), str(adapter), is_trainable=True)
        args = copy.copy(training_args)
        args.output_dir, args.eval_strategy = str(Path(training_args.output_dir) / method), "no"
        trainer = SFTTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
        if batch is None:  # TRL's tokenisation and collation, as in training
            batch = {k: v for k, v in next(iter(trainer.get_train_dataloader())).items() if k in MODEL_INPUTS}
        model = trainer.model.train()
        if training_args.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs
            )
            model.enable_input_require_grads()
        steps[method] = compare.timed_step(model, batch, device, autocast)
    return compare.interleaved_step_times(steps)


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")  # of a collated SFT batch
