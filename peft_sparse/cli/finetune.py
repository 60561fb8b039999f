"""``peft-sparse finetune``: fine-tune a real pretrained model on real labelled text with a sparse adapter and with
LoRA at the same trainable-parameter count, then compare them.

Each method runs in a worker process of its own and their steps are timed side by side at the end
(:mod:`peft_sparse.cli.compare`); the parent prints the comparison table and writes ``results.json`` and
``loss_curves.png`` next to the adapters.
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from pathlib import Path

from .._memory import reset_peak_memory
from ..tuner.config import SELECTION_METHODS, UPDATE_MODES
from . import compare, models
from . import data as data_module
from .common import MAX_LR, add_verbose_argument

CHOICE_METHODS = ("sparse", "lora", "both")
MAX_TOKENS = 64  # the built-in quotations are at most 200 characters: well under 64 word pieces
HELD_OUT_BATCH = 64
MAX_SEED = 2**64 - 1  # torch.manual_seed's range


class FinetuneError(Exception):
    """A problem found only once the command is under way (the output folder cannot be created, the training loss
    diverged, ...): reported like a bad argument, as one line naming it, with exit code 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        metavar="PATH_OR_NAME",
        help=f"{' or '.join(repr(n) for n in models.BUILTIN)} (built-in, shipped in PyPI packages; "
        f"default {models.DEFAULT_MODEL!r}), a local model folder or .gguf file, or a hub name "
        "(downloaded unless HF_HUB_OFFLINE=1)",
    )
    parser.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="labelled text: a .jsonl/.json/.csv file with 'text' and 'label' fields, or a folder "
        "written by datasets' save_to_disk (default: the Debian fortunes quotations, 5 classes)",
    )
    parser.add_argument(
        "--method",
        default="both",
        choices=CHOICE_METHODS,
        help="train the sparse adapter, a LoRA adapter, or both (compared at the same count)",
    )
    parser.add_argument(
        "--selection",
        default="gradient",
        choices=SELECTION_METHODS,
        help="salience metric choosing the sparse adapter's entries (SPEFT)",
    )
    parser.add_argument(
        "--compare-masks",
        action="store_true",
        help="also train sparse adapters with magnitude and random masks at the same count",
    )
    parser.add_argument(
        "--density",
        type=float,
        default=0.01,
        help="fraction of the targeted linear weights trained by the sparse adapter, in (0, 1]; "
        "LoRA takes the rank nearest to this count (at most the targeted weights' count), and "
        "with --method both the sparse adapter takes exactly LoRA's count",
    )
    parser.add_argument(
        "--update",
        default="static",
        choices=UPDATE_MODES,
        help="static mask; dynamic: re-rank every --update-interval steps; spiel: prune-and-regrow",
    )
    parser.add_argument("--update-interval", type=int, default=20, help="steps between mask updates (dynamic, spiel)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per method")
    parser.add_argument(
        "--lr",
        type=float,
        default=5e-3,
        help=f"AdamW learning rate (adapter and head), linear decay, at most {MAX_LR:.3g}; a run "
        "whose training loss becomes inf or nan stops there, unsaved, with exit code 2",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="training batch size")
    parser.add_argument(
        "--max-examples",
        type=int,
        default=750,
        help="records used in all (train + held-out), balanced over the labels",
    )
    parser.add_argument("--salience-batches", type=int, default=16, help="training batches salience is measured on")
    parser.add_argument(
        "--load-in-4bit",
        action="store_true",
        help="quantise the base to bitsandbytes NF4 (double quantisation) first, QLoRA-style",
    )
    parser.add_argument(
        "--output-dir",
        default="outputs/finetune",
        help="where each adapter, results.json and loss_curves.png are written; checked before "
        "training. If one of them cannot be written (e.g. a full disk), the table is still "
        "printed, one line on stderr names what is missing and where, and the exit code is 1",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help=f"seed of the split, the mask, the head and the order, 0 to {MAX_SEED}"
    )
    parser.add_argument("--no-plot", action="store_true", help="skip loss_curves.png")
    add_verbose_argument(parser)


def check_arguments(args: argparse.Namespace) -> str | None:
    """The first problem with the arguments, as one line naming the option and the value; None when fine."""
    if args.steps < 1:
        return f"--steps must be >= 1, got {args.steps}"
    if not 0.0 < args.density <= 1.0:
        return f"--density must be in (0, 1], got {args.density}"
    if not 0.0 < args.lr <= MAX_LR:  # lr inf would train to nan without a complaint
        return f"--lr must be a finite number in (0, {MAX_LR:.3g}], got {args.lr}"
    if not 0 <= args.seed <= MAX_SEED:
        return f"--seed must be in [0, {MAX_SEED}], got {args.seed}"
    for name in ("batch_size", "update_interval", "salience_batches"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    if args.max_examples < 4:
        return f"--max-examples must be >= 4, got {args.max_examples}"
    if args.data is not None and not Path(args.data).exists():
        return f"--data {args.data!r} does not exist"
    if args.method == "lora" and args.compare_masks:
        return "--compare-masks needs a sparse method (--method sparse or both), got --method lora"
    return compare.output_dir_problem(args.output_dir, [label for label, _ in planned_runs(args)])


def planned_runs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(label, selection) of every run, in order; selection is '' for LoRA."""
    runs = []
    if args.method in ("sparse", "both"):
        selections = [args.selection]
        if args.compare_masks:
            selections += [s for s in ("magnitude", "random") if s != args.selection]
        runs += [(f"sparse-{selection}", selection) for selection in selections]
    if args.method in ("lora", "both"):
        runs.append(("lora", ""))
    return runs


# ---------------------------------------------------------------------------------------------------- one run


def targeted_weights(base) -> int:
    """How many weights the adapters' layers (every linear layer but the head) hold."""
    from ..tuner.budget import targeted_linear_shapes

    return sum(rows * cols for rows, cols in targeted_linear_shapes(base, "all-linear", task_type="SEQ_CLS"))


def lora_rank_for(base, density: float) -> tuple[int, int]:
    """The rank of a LoRA adapter over every linear layer whose trainable count is nearest to ``density`` of those
    layers' weights, and that count (the sparse adapter's budget when the two are compared).

    The rank is at most the largest whose count fits in those weights (but at least 1): near ``density=1`` the
    nearest rank can overshoot them, and a sparse adapter cannot train more entries than there are."""
    from ..tuner.budget import targeted_linear_shapes

    shapes = targeted_linear_shapes(base, "all-linear", task_type="SEQ_CLS")
    per_rank = sum(rows + cols for rows, cols in shapes)
    total = sum(rows * cols for rows, cols in shapes)
    rank = max(1, min(round(density * total / per_rank), total // per_rank))
    return rank, rank * per_rank


def worker_inputs(args: argparse.Namespace):
    """What every worker starts from: (device, data split, model source, tokenizer), with transformers quiet."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    transformers.logging.set_verbosity_error()  # "newly initialised head weights" is expected here
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    source = models.resolve(args.model)
    return device, data_module.load(args.data, args.max_examples, args.seed), source, models.load_tokenizer(source)


def load_base(args: argparse.Namespace, device: str, dataset, source, tokenizer):
    """The pretrained body with a fresh seeded head, on ``device`` (a 4-bit base stays where bitsandbytes put it)."""
    base = models.load_classifier(source, len(dataset.label_names), args.seed, tokenizer, args.load_in_4bit)
    if device == "cuda" and not args.load_in_4bit:
        base.to(device)
    return base


def run_worker(args: argparse.Namespace, label: str) -> dict:
    """Train one method (``label``, of :func:`planned_runs`) and return its record; the adapter goes to
    ``output_dir/label``."""
    import torch
    from peft import LoraConfig, get_peft_model

    import peft_sparse

    from .classification import accuracy, batches, train

    selection = label.split("-", 1)[1] if label.startswith("sparse-") else ""
    torch.manual_seed(args.seed)
    device, dataset, source, tokenizer = worker_inputs(args)
    train_batches = list(batches(dataset.train, tokenizer, args.batch_size, MAX_TOKENS))
    held_out_batches = list(batches(dataset.held_out, tokenizer, HELD_OUT_BATCH, MAX_TOKENS))
    base = load_base(args, device, dataset, source, tokenizer)

    rank = count = None
    if args.method == "both" or not selection:
        rank, count = lora_rank_for(base, args.density)
        total = targeted_weights(base)
        if selection and count > total:  # only where rank 1 already overshoots (vector-like layers)
            raise FinetuneError(
                f"--method both: LoRA's smallest adapter (rank 1) has {count} parameters, more than "
                f"the {total} weights a sparse adapter could train; use --method sparse or lora"
            )
    if selection:
        budget = {"num_tunable_weights": count} if count is not None else {"density": args.density}
        config = peft_sparse.SparseConfig(
            task_type="SEQ_CLS",
            target_modules="all-linear",
            selection=selection,
            # The measured configurations: SPEFT's global top-k for the scale-carrying metrics (this command's
            # `gradient` default, benchmarks/quality.py); the relative score is scale-free per layer, so one density
            # per layer (SparseConfig's default).
            budget="local" if selection == "relative_gradient" else "global",
            update=args.update,
            update_interval=args.update_interval,
            salience_batches=args.salience_batches,
            seed=args.seed,
            **budget,
        )
        model = get_peft_model(base, config)
    else:
        model = get_peft_model(
            base,
            LoraConfig(
                task_type="SEQ_CLS", target_modules="all-linear", r=rank, lora_alpha=2 * rank, lora_dropout=0.0
            ),
        )
    to_device = (lambda b: {k: v.to(device) for k, v in b.items()}) if device == "cuda" else (lambda b: b)
    train_batches = [to_device(b) for b in train_batches]
    held_out_batches = [to_device(b) for b in held_out_batches]

    reset_peak_memory(device)
    selection_seconds = 0.0
    if selection and selection != "random":
        selection_seconds = peft_sparse.select_mask(model, train_batches).seconds
    adapter_params = sum(
        p.numel() for n, p in model.named_parameters() if p.requires_grad and ("sparse_values" in n or "lora_" in n)
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    accuracy_before = accuracy(model, held_out_batches)

    losses, step_seconds = train(
        model,
        dataset.train,
        tokenizer,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=MAX_TOKENS,
        seed=args.seed,
        update=args.update if selection else "static",
        update_interval=args.update_interval,
        update_batches=train_batches,
        to_device=to_device,
        progress=label,
    )

    accuracy_after = accuracy(model, held_out_batches)
    out = Path(args.output_dir) / label
    # A failed save (a full disk) must not lose the finished run: the record still goes back, naming the failure.
    adapter_error = compare.attempt_write(
        f"the {label} adapter",
        out,
        lambda: compare.save_adapter(model, out),
        left_behind="what is there is incomplete",
    )
    return {
        "label": label,
        "method": "sparse" if selection else "lora",
        "selection": selection,
        "update": args.update if selection else "",
        "lora_rank": rank if not selection else None,
        "adapter_params": adapter_params,
        "trainable": trainable,
        "losses": losses,
        "step_seconds_median": statistics.median(step_seconds),
        "selection_seconds": selection_seconds,
        "held_out_accuracy_before": accuracy_before,
        "held_out_accuracy": accuracy_after,
        "peak_memory_mb": compare.peak_memory_mb(device),
        "device": device,
        "adapter_dir": None if adapter_error else str(out),
        "adapter_error": adapter_error,
        "model": source.description,
        "data": dataset.source,
        "labels": dataset.label_names,
        "num_train": len(dataset.train),
        "num_held_out": len(dataset.held_out),
    }


def time_steps(args: argparse.Namespace, labels: list[str]) -> dict:
    """Time the training step of every saved adapter in ``labels`` side by side in this one process
    (:func:`~peft_sparse.cli.compare.interleaved_step_times`)."""
    from peft import PeftModel

    from .classification import batches

    device, dataset, source, tokenizer = worker_inputs(args)
    batch = next(iter(batches(dataset.train, tokenizer, args.batch_size, MAX_TOKENS)))
    batch = {k: v.to(device) for k, v in batch.items()}
    steps = {}
    for label in labels:
        base = load_base(args, device, dataset, source, tokenizer)
        model = PeftModel.from_pretrained(base, str(Path(args.output_dir) / label), is_trainable=True).train()
        steps[label] = compare.timed_step(model, batch, device)
    return compare.interleaved_step_times(steps)


# ---------------------------------------------------------------------------------------------------- compare


def _window(losses: list[float]) -> int:
    return max(1, min(10, len(losses) // 5))


def table(records: list[dict]) -> str:
    """The comparison as a markdown table (time and memory also as ratios to LoRA when LoRA ran)."""
    lora = next((r for r in records if r["method"] == "lora"), None)
    window = _window(records[0]["losses"])  # every run trains the same number of steps
    header = [
        "method",
        "trainable (adapter + head)",
        f"train loss, mean of the first -> last {window} steps" if window > 1 else "train loss, first -> last step",
        "held-out accuracy",
        "step time, median",
        "peak memory",
    ]
    rows = []
    for r in records:
        name = (
            f"LoRA r={r['lora_rank']}"
            if r["method"] == "lora"
            else f"sparse, {r['selection']} mask" + (f", {r['update']}" if r["update"] != "static" else "")
        )
        timed = r.get("step_seconds_interleaved")
        time_cell = f"{(timed or r['step_seconds_median']) * 1e3:.0f} ms"
        memory_cell = f"{r['peak_memory_mb']:.0f} MB"
        if lora is not None and r is not lora:
            if timed is not None:  # a ratio only where both were timed side by side (time_steps)
                time_cell += f" ({r['step_time_vs_lora']:.2f}x LoRA)"
            memory_cell += f" ({r['peak_memory_mb'] / lora['peak_memory_mb']:.2f}x LoRA)"
        rows.append(
            [
                name,
                f"{r['adapter_params']:,} + {r['trainable'] - r['adapter_params']:,}",
                f"{statistics.mean(r['losses'][:window]):.3f} -> {statistics.mean(r['losses'][-window:]):.3f}",
                f"{r['held_out_accuracy_before']:.1%} -> {r['held_out_accuracy']:.1%}",
                time_cell,
                memory_cell,
            ]
        )
    return compare.markdown_table(header, rows)


def plot(records: list[dict], path: Path) -> None:
    """The loss curves of every run, written to ``path`` (PNG)."""
    ylabel = f"train loss (bold: mean of the last {_window(records[0]['losses'])} steps)"
    with compare.loss_figure(path, "peft-sparse finetune: equal trainable parameters", ylabel) as axis:
        for r in records:
            losses = r["losses"]
            w = _window(losses)
            smooth = [statistics.mean(losses[max(0, i - w + 1) : i + 1]) for i in range(len(losses))]
            (line,) = axis.plot(
                range(1, len(losses) + 1), smooth, label=f"{r['label']} ({r['held_out_accuracy']:.1%} held-out)"
            )
            axis.plot(range(1, len(losses) + 1), losses, color=line.get_color(), alpha=0.2, linewidth=0.8)


def run(args: argparse.Namespace, argv: list[str], worker: str | None = None) -> int:
    """``peft-sparse finetune``: ``argv`` is the command's arguments; ``worker`` the method a worker process runs."""
    labels = [label for label, _ in planned_runs(args)]
    if worker is not None:
        problem = compare.worker_problem(worker, labels)
        if problem is not None:
            raise FinetuneError(problem)
        if worker == compare.TIMING_WORKER:
            return compare.send_record(lambda: time_steps(args, labels))
        return compare.send_record(lambda: run_worker(args, worker))
    # Fail fast, in this process, on what the workers would otherwise each fail on.
    data_module.load(args.data, args.max_examples, args.seed)
    models.resolve(args.model)
    return compare.run(
        compare.Comparison(
            command="finetune",
            argv=argv,
            methods=labels,
            output_dir=Path(args.output_dir),
            output_option="--output-dir",
            header=lambda records: header(args, records[0]),
            table=table,
            plot=None if args.no_plot else plot,
            error=FinetuneError,
        )
    )


def header(args: argparse.Namespace, first: dict) -> str:
    """The lines above the comparison table: the model, the data, the schedule."""
    labels = first["labels"]
    return "\n".join(
        [
            f"model: {first['model']}",
            f"data:  {first['data']}: {first['num_train']} train / {first['num_held_out']} held-out records, "
            f"{len(labels)} labels (chance {1 / len(labels):.0%})",
            f"{args.steps} steps of {args.batch_size}, AdamW lr {args.lr:g}; device {first['device']}"
            + (", 4-bit NF4 base" if args.load_in_4bit else ""),
        ]
    )
