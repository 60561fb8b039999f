"""A plain training loop for text classification with a peft adapter: what ``peft-sparse finetune`` and
``benchmarks/quality.py`` train with, so that both measure the same thing.

Examples are ``(text, label id)`` pairs; the model is a ``...ForSequenceClassification`` (or any model whose forward
takes the tokenizer's fields plus ``labels`` and returns ``.loss`` and ``.logits``).
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

__all__ = ["TrainingDiverged", "accuracy", "batches", "non_finite_parameter", "train"]


class TrainingDiverged(ArithmeticError):
    """The training loss, or a trained parameter, became inf or nan: training on cannot recover, and an adapter of
    nans must not be saved as a result."""


def batches(examples: Sequence[tuple[str, int]], tokenizer, batch_size: int, max_length: int) -> Iterator[dict]:
    """The examples in order, ``batch_size`` at a time: tokenised (padded, cut at ``max_length`` tokens) with a
    ``labels`` tensor."""
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        encoded = tokenizer(
            [text for text, _ in chunk], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        encoded["labels"] = torch.tensor([label for _, label in chunk])
        yield dict(encoded)


def accuracy(model, held_out_batches) -> float:
    """The share of examples whose highest logit is their label (eval mode, no gradients; back to train mode)."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in held_out_batches:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            total += len(batch["labels"])
    model.train()
    return correct / total


def train(
    model,
    examples: Sequence[tuple[str, int]],
    tokenizer,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    max_length: int,
    seed: int,
    update: str = "static",
    update_interval: int = 1,
    update_batches=None,
    to_device: Callable[[dict], Any] = lambda batch: batch,
    progress: str | None = None,
) -> tuple[list[float], list[float]]:
    """Train ``model`` for ``steps`` optimizer steps on ``examples``: AdamW (no weight decay) on every trainable
    parameter, the learning rate decaying linearly to zero, a fresh shuffle of the examples (seeded) each epoch.

    ``update="spiel"`` runs SpIEL's prune-and-regrow after each step; ``"dynamic"`` re-ranks the mask with
    :func:`~peft_sparse.update_mask` on ``update_batches`` every ``update_interval`` steps (not after the last).
    ``progress`` names a tqdm bar on stderr (None: no bar). Returns each step's loss and wall time (CUDA
    synchronised).

    Raises:
        TrainingDiverged: when a step's loss, or a trained parameter after the last step, is inf or nan.
    """
    from ..selection import SpIEL, update_mask

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=steps)
    spiel = SpIEL(model, optimizer, num_training_steps=steps) if update == "spiel" else None
    order = torch.Generator().manual_seed(seed)
    cuda = torch.cuda.is_available()
    run = f"the {progress} run: " if progress else ""
    losses, step_seconds, epoch_batches = [], [], []
    model.train()
    bar = tqdm(range(steps), desc=f"{progress or '':>16}", unit="step", file=sys.stderr, disable=progress is None)
    for step in bar:
        if not epoch_batches:  # a fresh shuffle of the training set each epoch
            permutation = torch.randperm(len(examples), generator=order).tolist()
            shuffled = [examples[i] for i in permutation]
            epoch_batches = [to_device(b) for b in batches(shuffled, tokenizer, batch_size, max_length)]
        batch = epoch_batches.pop(0)
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if spiel is not None:
            spiel.step()
        elif update == "dynamic" and (step + 1) % update_interval == 0 and step + 1 < steps:
            update_mask(model, update_batches, optimizer=optimizer)
        if cuda:
            torch.cuda.synchronize()
        step_seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            bar.close()
            raise TrainingDiverged(
                f"{run}the training loss became {losses[-1]} at step {step + 1} of {steps} "
                f"(learning rate {lr:g}); try a lower learning rate"
            )
        bar.set_postfix(loss=f"{statistics.mean(losses[-10:]):.3f}")
    bar.close()
    # The last step's loss was computed before that step's update, which can itself overflow (a huge learning rate).
    diverged = non_finite_parameter(model)
    if diverged is not None:
        raise TrainingDiverged(
            f"{run}the trained parameter {diverged} holds inf or nan after step {steps} "
            f"(learning rate {lr:g}); try a lower learning rate"
        )
    return losses, step_seconds


def non_finite_parameter(model) -> str | None:
    """The name of the first trained parameter holding inf or nan, or ``None``."""
    return next((name for name, p in model.named_parameters() if p.requires_grad and not p.isfinite().all()), None)
