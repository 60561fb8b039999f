"""How many salience batches the gradient mask needs: the mask chosen from the first n batches of the
training data loader, for n = 1, 2, 4, ..., 64, against the 64-batch mask.

    python benchmarks/salience_batches.py run --task wordnet        # records/salience_batches/wordnet.json
    python benchmarks/salience_batches.py table --write             # the RESULTS.md section (run --write: both)

The setup is the suite's (`suite.py`): SmolLM2-135M-Instruct, a sparse adapter at LoRA r=8's count with the default
config (`selection="gradient"`, per-layer budget), the SFTTrainer's own shuffled train data loader at seed 0 (the
batches the training callback selects on: one salience batch costs one training step's forward and backward). Each
mask is the one `select_mask` writes into the adapter. For each n: the share of the 64-batch mask's entries it holds
(random: the density), and the share of the *held-out* gradient it holds (the validation split's dense gradient,
squared, summed over the mask, over its layer's total; entry-weighted over layers; random: the density) against the
64-batch mask's share. Quality at fewer batches, trained, is the suite's (`suite.py run --salience-batches N`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from common import RESULTS, machine, mean_std, write_section

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "benchmarks" / "records" / "salience_batches"
COUNTS = (1, 2, 4, 8, 16, 32, 64)


def study(task_name: str, counts: tuple[int, ...], bfloat16: bool = False) -> dict:
    """The masks of ``counts`` batches (fp32 accumulators; ``bfloat16``: also with bf16 accumulators, each against
    the fp32 mask of the same batches)."""
    import suite

    import peft_sparse
    from peft_sparse.selection import salience_scores
    from peft_sparse.tuner.lookup import resolve_adapter, sparse_layers

    task = suite.TASKS[task_name]
    most = max(counts)
    trainer, _, _, _, _ = suite.build_run(task, "gradient", 1e-3, 0, most)
    model = trainer.model
    loader = trainer.get_train_dataloader()
    batches = []
    for batch in loader:  # the first `most` batches, in the order training (and the callback) sees them
        batches.append(batch)
        if len(batches) == most:
            break
    if len(batches) < most:
        raise SystemExit(f"{task_name}: the train loader has {len(batches)} batches, fewer than {most}")
    # The held-out gradient: |sum of the validation batches' gradients| per weight, by the gradient metric itself.
    held_out = salience_scores(model, list(trainer.get_eval_dataloader("validation")))
    layers = sparse_layers(resolve_adapter(model, None, "study")[0], "default")  # named as salience_scores names
    total = sum(layer.num_weight_entries for _, layer in layers)
    masks, rows = {}, []

    def overlap(mask, other) -> float:
        chosen = sum(indices.numel() for indices in mask.values())
        return sum(int(torch.isin(indices, other[name]).sum()) for name, indices in mask.items()) / chosen

    dtypes = (torch.float32, torch.bfloat16) if bfloat16 else (torch.float32,)
    for count in sorted(counts, reverse=True):
        for dtype in dtypes:
            start = time.perf_counter()
            report = peft_sparse.select_mask(
                model, batches[:count], num_batches=count, reset_values=True, accumulation_dtype=dtype
            )
            seconds = time.perf_counter() - start
            mask = {name: layer.sparse_indices["default"].to(torch.int64).clone() for name, layer in layers}
            held = 0.0
            for name, indices in mask.items():
                square = held_out[name].flatten().double().square()
                held += indices.numel() * float(square[indices].sum() / square.sum())
            held /= sum(indices.numel() for indices in mask.values())
            row = {"batches": count, "accumulation": str(dtype).removeprefix("torch.")}
            if dtype == torch.float32:
                masks[count] = mask
            else:
                row["overlap_with_float32"] = round(overlap(mask, masks[count]), 4)
            row.update(
                passes=report.passes,
                forward_backward=report.forward_backward_passes,
                seconds=round(seconds, 1),
                overlap_with_most=round(overlap(mask, masks[most]), 4),
                held_out_square_share=round(held, 4),
            )
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return {
        "task": task_name,
        "entries": sum(indices.numel() for indices in masks[most].values()),
        "density": round(sum(i.numel() for i in masks[most].values()) / total, 5),
        "batch": task.batch,
        "tokens": suite.LENGTH,
        "machine": machine("cpu"),
        "date": time.strftime("%Y-%m-%d"),
        "rows": sorted(rows, key=lambda row: (row["batches"], row.get("accumulation", "float32"))),
    }


def table(tasks: list[str]) -> str:
    lines = [
        "## How many salience batches the gradient mask needs (`benchmarks/salience_batches.py`)",
        "",
        "Command: `python benchmarks/salience_batches.py run --task TASK`, then `table --write`. SmolLM2-135M-Instruct,"
        " the default sparse config (gradient, per-layer budget) at LoRA r=8's count, the suite's SFTTrainer loader at "
        "seed 0 (one salience batch = one training step's forward and backward). Overlap: the share of the most-batch "
        "mask's entries the n-batch mask holds; held-out share: the share of the validation split's squared gradient "
        "the mask holds (both are the density for a random mask). Seconds: `select_mask`'s wall time on one thread; the "
        "run of 2026-12-07 shared the machine's two cores with three other processes, so they show scale only (one "
        "salience batch costs about what one training step costs: forward and backward).",
        "",
    ]
    for name in tasks:
        path = RECORDS / f"{name}.json"
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        extra = RECORDS / f"{name}-bfloat16.json"
        if extra.exists():
            record["rows"] += [r for r in json.loads(extra.read_text())["rows"] if r["accumulation"] == "bfloat16"]
        lines += [
            f"### `{name}` ({record['entries']:,} entries, density {record['density']:.2%}, batches of "
            f"{record['batch']} x {record['tokens']} tokens; {record['machine']}, {record['date']})",
            "",
            f"| salience batches | overlap with the {max(r['batches'] for r in record['rows'])}-batch mask | held-out squared "
            "gradient held | seconds |",
            "|---|---|---|---|",
        ]
        for row in record["rows"]:
            if row.get("accumulation", "float32") != "float32":
                continue
            lines.append(
                f"| {row['batches']} | {row['overlap_with_most']:.1%} | {row['held_out_square_share']:.1%} | "
                f"{row['seconds']:.0f} |"
            )
        lines.append("")
        for row in record["rows"]:
            if row.get("accumulation", "float32") == "bfloat16":
                lines += [
                    f"With bfloat16 accumulators (half the memory, so half the passes where memory is tight), "
                    f"{row['batches']} batches: {row['overlap_with_float32']:.1%} of the float32 mask's entries, "
                    f"{row['held_out_square_share']:.1%} of the held-out squared gradient.",
                    "",
                ]
    lines += quality_table(tasks)
    return "\n".join(lines)


def quality_table(tasks: list[str]) -> list[str]:
    """The trained result of the default mask at its suite rate with each number of salience batches the suite's
    records hold (`suite.py run --methods gradient --salience-batches N --rate R`), seeds 0-2."""
    import suite

    lines = []
    for name in tasks:
        path = suite.RECORDS / f"{name}.json"
        if not path.exists():
            continue
        records = [r for r in json.loads(path.read_text()) if r["method"] == "gradient"]
        key = suite.TASKS[name].report[0]
        rates = {}
        for r in records:
            rates.setdefault((r["salience_batches"], r["lr"]), {})[r["seed"]] = r[key]
        rows = [
            (batches, lr, [scores[seed] for seed in suite.SEEDS])
            for (batches, lr), scores in sorted(rates.items())
            if all(seed in scores for seed in suite.SEEDS)
        ]
        if len({batches for batches, _, _ in rows}) < 2:
            continue
        lines += [
            f"Trained, `{name}` (the suite's runs: SFTTrainer and the callback, seeds 0-2; {key.replace('_', ' ')}, "
            "mean ± standard deviation):",
            "",
            "| salience batches | lr | " + key.replace("_", " ") + " | per seed |",
            "|---|---|---|---|",
        ]
        for batches, lr, scores in rows:
            lines.append(
                f"| {batches} | {lr:g} | {mean_std(scores)} | " + ", ".join(f"{score:.3f}" for score in scores) + " |"
            )
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("run", "table"))
    parser.add_argument("--task", action="append", help="a text task of suite.py (default: wordnet)")
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS))
    parser.add_argument("--bfloat16", action="store_true", help="also select with bf16 accumulators")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = args.task or ["wordnet"]
    if args.what == "run":
        import transformers

        transformers.logging.set_verbosity_error()
        warnings.filterwarnings("ignore")
        RECORDS.mkdir(parents=True, exist_ok=True)
        for name in tasks:
            result = study(name, tuple(args.counts), args.bfloat16)
            path = RECORDS / (f"{name}-bfloat16.json" if args.bfloat16 else f"{name}.json")
            path.write_text(json.dumps(result, indent=1) + "\n")
    text = table(tasks)
    if args.write:
        write_section(RESULTS, text)
    print(text)


if __name__ == "__main__":
    main()
