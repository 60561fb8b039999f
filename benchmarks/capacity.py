"""Capacity at equal trainable parameters: how much each method can *learn* in a fixed number of steps, and what it
forgets meanwhile. The sibling of `sft_quality.py` (same model, methods, rate rule and seeds), on tasks where the
update's capacity, not generalisation, is the limit.

    python benchmarks/capacity.py --task memorise --write     # the sweep, then the seeds, then RESULTS.md
    python benchmarks/capacity.py --task facts --write

Tasks (SmolLM2-135M-Instruct, full-sequence or completion-only causal-LM loss, AdamW with linear decay, no warm-up):

* `memorise`: 96 Italian quotations (Debian `fortunes-it`, a language the model barely knows), 8 epochs of batches of
  8 (96 steps), 64 tokens. Scored by the loss on those same 96 texts (the fit) and, for forgetting, the loss on 64
  English quotations (Debian `fortunes-min`) that no run trains on.
* `facts`: 256 independent facts, "What is the code of the word 'harbor'?" -> a seeded random 4-digit number, words
  from WordNet (Debian `wordnet-base`); nothing in pretraining predicts them, so only stored capacity can. 8 epochs of
  batches of 16 (128 steps); completion-only loss. Scored by the loss on the answers and exact recall (greedy answer
  equals the number), on the trained facts themselves.

Rate rule: each method's grid at seed 0, scored by the task's own score (the fit, or the facts' loss; these tasks
measure what a run can store, so the training texts are the test); a best at an edge is extended on the 1-3-10 ladder
as in `sft_quality.py`; then the best rate with every seed. Raw records go to `--out` (JSON, resumable: a finished
run is never repeated, so a long sweep can be done in pieces).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import warnings
from datetime import date
from pathlib import Path

from common import machine, mean_std, sweep, write_section
from sft_quality import GRIDS, LABELS, METHODS, build_trainer

ROOT = Path(__file__).resolve().parents[1]
ITALIAN = Path("/usr/share/games/fortunes/it/italia")  # apt-get install fortunes-it
ENGLISH = Path("/usr/share/games/fortunes/fortunes")  # apt-get install fortunes-min
TASKS = {
    # task: (examples, epochs, batch, score key)
    "memorise": (96, 8, 8, "fit_loss"),
    "facts": (256, 8, 16, "facts_loss"),
}


def quotations(path: Path, count: int, seed: int = 0, max_chars: int = 200) -> list[str]:
    """``count`` quotations of at most ``max_chars`` characters from a fortune file, seeded."""
    if not path.exists():
        package = "fortunes-it" if "/it/" in str(path) else "fortunes-min"
        raise SystemExit(f"{path} is missing: apt-get install {package}")
    texts = [t.strip() for t in path.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
    texts = [t for t in texts if 30 < len(t) <= max_chars]
    random.Random(seed).shuffle(texts)
    if len(texts) < count:
        raise SystemExit(f"{path} has {len(texts)} quotations of at most {max_chars} characters, {count} needed")
    return texts[:count]


def facts(count: int, seed: int = 0) -> list[dict]:
    """``count`` word -> random 4-digit code facts as prompt-completion chat rows (with an ``answer`` column)."""
    from peft_sparse.cli import instructions

    words = sorted({word for word, _, _ in instructions.definitions()})
    rng = random.Random(seed)
    rng.shuffle(words)
    rows = []
    for word in words[:count]:
        code = str(rng.randrange(1000, 10000))
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is the code of the word '{word}'?"}],
                "completion": [{"role": "assistant", "content": code}],
                "task": "code",
                "answer": code,
            }
        )
    return rows


def shape(task: str, args) -> tuple[int, int, int]:
    """(examples, epochs, batch) of ``task``, with the command line's overrides."""
    count, epochs, batch, _ = TASKS[task]
    return args.examples or count, args.epochs or epochs, args.batch or batch


def datasets_for(task: str, count: int):
    from datasets import Dataset

    if task == "memorise":
        train = Dataset.from_list([{"text": t} for t in quotations(ITALIAN, count)])
        return train, {"fit": train, "english": Dataset.from_list([{"text": t} for t in quotations(ENGLISH, 64)])}
    train = Dataset.from_list(facts(count))
    return train, {"facts": train}


def run(task: str, method: str, lr: float, seed: int, args) -> dict:
    """One training run of ``method`` on ``task``; returns its scores and time."""
    from peft_sparse.cli.sft.evaluation import exact_match

    count, epochs, batch = shape(task, args)
    train, evaluation = datasets_for(task, count)
    trainer, tokenizer, trainable = build_trainer(
        method,
        lr,
        seed,
        args,
        train,
        evaluation,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch,
        max_length=64,
    )
    start = time.perf_counter()
    if method != "none":
        trainer.train()
    seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    record = {
        "task": task,
        "method": method,
        "lr": lr,
        "seed": seed,
        "examples": count,
        "epochs": epochs,
        "batch": batch,
        "trainable": trainable,
        "steps": trainer.state.global_step,
        "seconds": seconds,
        **{f"{name}_loss": metrics[f"eval_{name}_loss"] for name in evaluation},
    }
    if task == "facts":
        recall = exact_match(trainer.model, tokenizer, train, max_rows=count, task="code", max_new_tokens=6)
        record["recall"], record["recall_rows"] = recall
    return record


def key(record: dict) -> tuple:
    task = record["task"]
    sizes = tuple(record.get(name, TASKS[task][i]) for i, name in enumerate(("examples", "epochs", "batch")))
    return (task, record["method"], record["lr"], record["seed"], *sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=tuple(TASKS), default="memorise")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--examples", type=int, help="texts or facts to learn (default: the task's)")
    parser.add_argument("--epochs", type=int, help="passes over them (default: the task's)")
    parser.add_argument("--batch", type=int, help="examples per step (default: the task's)")
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="METHOD=LR,LR,...",
        help="start METHOD's rate grid here instead of at sft_quality.py's (the edge rule still applies); repeatable",
    )
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank whose count every method gets")
    parser.add_argument("--salience-batches", type=int, default=4, help="batches of the gradient-salience pass")
    parser.add_argument("--out", default="/tmp/capacity/runs.json", help="raw results (JSON; resumable)")
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = parser.parse_args()
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = json.loads(out.read_text()) if out.exists() else []
    done = {key(r): r for r in records}
    task = args.task
    score_key = TASKS[task][3]

    sizes = shape(task, args)

    def get(method, lr, seed):
        if (task, method, lr, seed, *sizes) not in done:
            record = run(task, method, lr, seed, args)
            records.append(record)
            done[key(record)] = record
            out.write_text(json.dumps(records, indent=1))
            scores = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k.endswith("_loss") or k == "recall")
            print(f"{task} {method:16s} lr {lr:g} seed {seed}: {scores} ({record['seconds']:.0f} s)", file=sys.stderr)
        return done[(task, method, lr, seed, *sizes)]

    start = dict(GRIDS)
    for spec in args.grid:
        method, _, rates = spec.partition("=")
        if method not in start or not rates:
            parser.error(f"--grid: expected METHOD=LR,LR,... with METHOD one of {list(start)}, got {spec!r}")
        start[method] = tuple(sorted(float(rate) for rate in rates.split(",")))
    best, grids, results = {}, {}, {}
    for method in args.methods:
        grids[method], best[method] = sweep(start[method], lambda lr, method=method: get(method, lr, 0), score_key)
        results[method] = [get(method, best[method], seed) for seed in args.seeds]
    untrained = get("none", 0.0, 0)

    count, epochs, batch = shape(task, args)
    flags = "".join(
        f" --{name} {getattr(args, name)}" for name in ("examples", "epochs", "batch") if getattr(args, name)
    )
    flags += "".join(f" --grid {spec}" for spec in args.grid)
    command = (
        f"python benchmarks/capacity.py --task {task}{flags} --methods {' '.join(args.methods)} --seeds "
        f"{' '.join(map(str, args.seeds))} --lora-r {args.lora_r} --salience-batches {args.salience_batches} --write"
    )
    if task == "memorise":
        what = (
            f"{count} Italian quotations (`fortunes-it`), {epochs} epochs of {batch}; "
            "fit: loss on those texts; forgetting: loss on 64 English quotations (`fortunes-min`) never trained on"
        )
        columns = ("fit loss", "English loss (forgetting)")
        keys = ("fit_loss", "english_loss")
    else:
        what = (
            f"{count} word -> random 4-digit code facts (WordNet words), {epochs} epochs of {batch}; loss on the "
            "answers and exact recall of the trained facts"
        )
        columns = ("answer loss", "exact recall")
        keys = ("facts_loss", "recall")
    lines = [
        f"## Capacity at equal trainable parameters: `{task}` (`benchmarks/capacity.py`)",
        "",
        f"Command: `{command}`, run on {date.today()} on {machine('cpu')}.",
        "",
        (
            f"SmolLM2-135M-Instruct, {what}. AdamW, linear decay, no warm-up, sequences cut at 64 tokens. Every method "
            f"but full fine-tuning trains about LoRA r={args.lora_r}'s count over all linear layers. Rate: each "
            "method's best on its grid at seed 0 by the first score column (edges extended on the 1-3-10 ladder), "
            "then every seed at that rate."
        ),
        "",
        f"| method | trainable | lr (grid) | {columns[0]} per lr | {columns[1]} per lr | {columns[0]}, mean ± std | "
        f"{columns[1]}, mean ± std | run time, median |",
        "|---|---|---|---|---|---|---|---|",
        f"| not fine-tuned | 0 | | | | {untrained[keys[0]]:.3f} | {untrained[keys[1]]:.3f} | |",
    ]
    for method, runs in results.items():
        per_rate = ", ".join(f"{done[(task, method, lr, 0, *sizes)][keys[0]]:.3f}" for lr in grids[method])
        other = ", ".join(f"{done[(task, method, lr, 0, *sizes)][keys[1]]:.3f}" for lr in grids[method])
        lines.append(
            f"| {LABELS[method]} | {runs[0]['trainable']:,} | {best[method]:g} ({'/'.join(f'{lr:g}' for lr in grids[method])}) "
            f"| {per_rate} | {other} | {mean_std([r[keys[0]] for r in runs])} | "
            f"{mean_std([r[keys[1]] for r in runs], percent=keys[1] == 'recall')} | "
            f"{statistics.median(r['seconds'] for r in runs):.0f} s |"
        )
    text = "\n".join(lines + [""])
    print(text)
    if args.write:
        write_section(ROOT / "benchmarks" / "RESULTS.md", text)


if __name__ == "__main__":
    main()
