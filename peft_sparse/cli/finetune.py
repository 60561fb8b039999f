"""``peft-sparse finetune``: fine-tune a real pretrained model on real labelled text with a sparse adapter and with
LoRA at the same trainable-parameter count, then compare them.

Each method runs in its own Python process (this one re-invoked with ``--worker``), so that its peak memory is its
own and nothing one run leaves behind (allocator caches, autograd state) tilts the next. The parent collects each
run's JSON record (sent on the worker's stdout, not through a file, so that a full disk cannot lose it), prints the
comparison table, and writes ``results.json`` and ``loss_curves.png`` next to the adapters. What cannot be written
(e.g. a full disk) is named in one line on stderr after the table, and the exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .._memory import peak_memory_bytes, reset_peak_memory
from ..tuner.config import SELECTION_METHODS, UPDATE_MODES
from . import USAGE_ERROR, add_verbose_argument, models
from . import data as data_module

CHOICE_METHODS = ("sparse", "lora", "both")
MAX_TOKENS = 64  # the built-in quotations are at most 200 characters: well under 64 word pieces
HELD_OUT_BATCH = 64
ACCUMULATION_STEPS = 5  # SpIEL-AG: backward passes whose gradients choose the regrown entries (capped by the interval)
MAX_SEED = 2**64 - 1  # torch.manual_seed's range
# AdamW's first step is lr / (1 - beta1) = 10 x lr, and torch refuses (with a traceback) a step that float32, the
# trainable parameters' dtype, cannot hold.
MAX_LR = 3.4028234663852886e38 / 10
RESULTS_FILE, PLOT_FILE = "results.json", "loss_curves.png"


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
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one method, JSON to stdout


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
    return output_dir_problem(args.output_dir, [label for label, _ in planned_runs(args)])


def output_dir_problem(output_dir: str, labels: list[str], option: str = "--output-dir") -> str | None:
    """Why ``output_dir`` cannot receive the results (None when it can), found without creating anything, so that
    a run that could not be saved is refused before any training rather than failing after it.

    Each of ``labels`` becomes a folder in it (an adapter), next to the results and the plot; ``option`` is how the
    message names the command's output-folder option."""
    path = Path(output_dir)
    try:
        for folder in (path, *path.parents):  # the nearest existing one decides; "out/run" is made in "out" or "."
            if folder.is_dir():
                if not os.access(folder, os.W_OK | os.X_OK):
                    where = "" if folder == path else f" cannot be created: {str(folder)!r}"
                    return f"{option} {output_dir!r}{where} is not writable"
                break
            if os.path.lexists(folder):  # a file (or a dangling link) where a folder has to be
                where = "" if folder == path else f": {str(folder)!r}"
                return f"{option} {output_dir!r}{where} is a file, not a folder"
        if path.is_dir():  # what a run writes must not be blocked by something of the other kind already there
            wanted = [(label, True) for label in labels] + [(RESULTS_FILE, False), (PLOT_FILE, False)]
            for name, folder_wanted in wanted:
                existing = path / name
                if existing.exists() and existing.is_dir() != folder_wanted:
                    kind = "a file, not a folder" if folder_wanted else "a folder, not a file"
                    return f"{option} {output_dir!r}: {str(existing)!r} is {kind}"
    except OSError as err:  # e.g. a parent folder that may not be searched (Path.is_dir raises on EACCES)
        return f"{option} {output_dir!r} cannot be checked ({err.strerror or err})"
    return None


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


def peak_memory_mb(device: str) -> float:
    """Peak allocated CUDA memory, or on CPU the process's peak resident set (:mod:`peft_sparse._memory`), in MiB."""
    peak = peak_memory_bytes(device)
    return float("nan") if peak is None else peak / 2**20


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


def attempt_write(what: str, path: Path, write: Callable[[], None], left_behind: str = "") -> str | None:
    """Call ``write``; when it fails with an OSError (a full disk, a read-only or vanished folder), return a phrase
    naming ``what`` was not written, where and why (and ``left_behind``, what that leaves there), so that the run's
    results can still be shown. None when it was written."""
    try:
        write()
    except OSError as err:
        return f"{what} to {path} ({err.strerror or err}{'; ' + left_behind if left_behind else ''})"
    return None


def save_adapter(model, folder: Path) -> None:
    """Write the trained adapter (peft's ``save_pretrained``) to ``folder``."""
    model.save_pretrained(folder)


def write_results(records: list[dict], path: Path) -> None:
    """Write every run's record to ``path`` as JSON."""
    try:
        path.write_text(json.dumps(records, indent=1))
    except OSError:
        path.unlink(missing_ok=True)  # a truncated results.json (or an old one) must not pass for this run's
        raise


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


def run_worker(args: argparse.Namespace) -> dict:
    """Train one method (``args.worker``) and return its record; the adapter goes to ``output_dir/label``."""
    import torch
    from peft import LoraConfig, get_peft_model

    import peft_sparse

    from ..classification import accuracy, batches, train

    label = args.worker
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
            accumulation_steps=min(ACCUMULATION_STEPS, args.update_interval),
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
    adapter_error = attempt_write(
        f"the {label} adapter", out, lambda: save_adapter(model, out), left_behind="what is there is incomplete"
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
        "peak_memory_mb": peak_memory_mb(device),
        "device": device,
        "adapter_dir": None if adapter_error else str(out),
        "adapter_error": adapter_error,
        "model": source.description,
        "data": dataset.source,
        "labels": dataset.label_names,
        "num_train": len(dataset.train),
        "num_held_out": len(dataset.held_out),
    }


TIMING_WORKER = "timing"
TIMING_ROUNDS = 6


def time_steps(args: argparse.Namespace, labels: list[str]) -> dict:
    """Time the training step of every saved adapter in ``labels`` side by side in this one process
    (:func:`interleaved_step_times`)."""
    from peft import PeftModel

    from ..classification import batches

    device, dataset, source, tokenizer = worker_inputs(args)
    batch = next(iter(batches(dataset.train, tokenizer, args.batch_size, MAX_TOKENS)))
    batch = {k: v.to(device) for k, v in batch.items()}
    steps = {}
    for label in labels:
        base = load_base(args, device, dataset, source, tokenizer)
        model = PeftModel.from_pretrained(base, str(Path(args.output_dir) / label), is_trainable=True).train()
        steps[label] = timed_step(model, batch, device)
    return interleaved_step_times(steps)


def timed_step(model, batch: dict, device: str, autocast_dtype=None) -> Callable[[], float]:
    """A function that runs one training step of ``model`` on ``batch`` (forward, backward, AdamW on its trainable
    parameters; under ``torch.autocast`` with ``autocast_dtype``, as the Trainer's bf16/fp16) and returns its wall
    time in seconds."""
    import contextlib

    import torch

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step() -> float:
        start = time.perf_counter()
        autocast = (
            torch.autocast(device, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
        )
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def interleaved_step_times(steps: dict[str, Callable[[], float]]) -> dict:
    """Run ``steps`` (label -> one timed training step, LoRA's labelled ``"lora"``) interleaved: each round runs one
    step of each method back to back, so a slow phase of the machine (another job, a throttled core) slows all of
    them alike. Returns each method's median step time and the median over rounds of its step time divided by
    LoRA's in the same round, the first round (a warm-up) left out."""
    times = {label: [] for label in steps}
    for round_index in range(TIMING_ROUNDS + 1):
        for label, step in steps.items():
            seconds = step()
            if round_index:
                times[label].append(seconds)
    return {
        "rounds": TIMING_ROUNDS,
        "step_seconds": {label: statistics.median(t) for label, t in times.items()},
        "vs_lora": {
            label: statistics.median(a / b for a, b in zip(t, times["lora"], strict=True))
            for label, t in times.items()
        },
    }


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
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def plot(records: list[dict], path: Path) -> None:
    """The loss curves of every run, written to ``path`` (PNG)."""
    ylabel = f"train loss (bold: mean of the last {_window(records[0]['losses'])} steps)"
    with loss_figure(path, "peft-sparse finetune: equal trainable parameters", ylabel) as axis:
        for r in records:
            losses = r["losses"]
            w = _window(losses)
            smooth = [statistics.mean(losses[max(0, i - w + 1) : i + 1]) for i in range(len(losses))]
            (line,) = axis.plot(
                range(1, len(losses) + 1), smooth, label=f"{r['label']} ({r['held_out_accuracy']:.1%} held-out)"
            )
            axis.plot(range(1, len(losses) + 1), losses, color=line.get_color(), alpha=0.2, linewidth=0.8)


YLABEL_WIDTH = 34  # characters per line of a y-axis label: what the 4-inch-high loss figure holds


@contextmanager
def loss_figure(path: Path, title: str, ylabel: str, **legend) -> Iterator:
    """A matplotlib axis to draw loss curves on (against the optimizer step); on leaving, the figure gets its labels,
    grid and legend (``legend``: its keyword arguments) and is written to ``path`` (PNG). A failed write leaves no
    file there: a truncated image, or an old one, must not pass for this run's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    try:
        yield axis
        axis.set_xlabel("optimizer step")
        axis.set_ylabel(textwrap.fill(ylabel, YLABEL_WIDTH))  # one long line runs off the figure's height
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(**legend)
        figure.tight_layout()
        try:
            figure.savefig(path)
        except OSError:
            path.unlink(missing_ok=True)
            raise
    finally:
        plt.close(figure)


def add_interleaved_step_times(records: list[dict], argv: list[str]) -> str | None:
    """With LoRA and at least one sparse run, time their steps side by side in one more process
    (:func:`time_steps`) and add ``step_seconds_interleaved`` and ``step_time_vs_lora`` to their records: step times
    of runs made one after the other are not comparable on a machine whose load changes. Returns why no ratio could
    be taken, or None (also when an adapter could not be saved: its own error line says so, and the table then shows
    no ratios)."""
    if "lora" not in [r["method"] for r in records] or len(records) < 2:
        return None
    if any(not r["adapter_dir"] for r in records):  # already named in its own error line; the table shows no ratio
        return None
    labels = [r["label"] for r in records]
    code, timing = run_worker_process(["finetune", *argv, "--worker", f"{TIMING_WORKER}:{','.join(labels)}"])
    if code != 0:
        return f"no step-time ratios: the side-by-side timing run failed (exit code {code})"
    for record in records:
        if record["label"] in labels:
            record["step_seconds_interleaved"] = timing["step_seconds"][record["label"]]
            record["step_time_vs_lora"] = timing["vs_lora"][record["label"]]
            record["timing_rounds"] = timing["rounds"]
    return None


def run_method(label: str, argv: list[str]) -> tuple[int, dict | None]:
    """Run one method in its own process: its exit code and, when it succeeded, its record."""
    return run_worker_process(["finetune", *argv, "--worker", label])


def run_worker_process(cli_argv: list[str]) -> tuple[int, dict | None]:
    """Run ``peft-sparse *cli_argv`` (a worker: see :func:`send_record`) in a fresh Python process, offline: its exit
    code and, when it succeeded, the JSON record it wrote to stdout. Its stderr (progress, errors) is the user's."""
    command = [sys.executable, "-m", "_peft_sparse_cli", *cli_argv]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    completed = subprocess.run(command, env=env, stdout=subprocess.PIPE, check=False)
    if completed.returncode != 0:
        return completed.returncode, None
    return 0, json.loads(completed.stdout)


def send_record(work: Callable[[], dict]) -> int:
    """Worker side: call ``work`` and write the record it returns to stdout as JSON, the one thing written there
    (anything else printed meanwhile, by Python or native code, goes to stderr)."""
    channel = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    record = work()
    with channel:
        channel.write(json.dumps(record))
    return 0


def run(args: argparse.Namespace, argv: list[str]) -> int:
    if args.worker is not None and args.worker.startswith(TIMING_WORKER + ":"):
        return send_record(lambda: time_steps(args, args.worker.split(":", 1)[1].split(",")))
    if args.worker is not None:
        return send_record(lambda: run_worker(args))
    # Fail fast, in this process, on what the workers would otherwise each fail on.
    data_module.load(args.data, args.max_examples, args.seed)
    models.resolve(args.model)
    output_dir = Path(args.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # what check_arguments cannot see (a read-only file system, a race)
        raise FinetuneError(f"--output-dir {args.output_dir!r} cannot be created ({err.strerror or err})") from None
    records = []
    start = time.perf_counter()
    for label, _ in planned_runs(args):
        code, record = run_method(label, argv)
        if code == USAGE_ERROR:  # the worker has said why, in one line (a diverged loss, ...)
            return USAGE_ERROR
        if code != 0:
            print(f"peft-sparse finetune: the {label} run failed (exit code {code})", file=sys.stderr)
            return 1
        records.append(record)
    timing_problem = add_interleaved_step_times(records, argv)
    not_written = [r["adapter_error"] for r in records if r["adapter_error"]]
    results_path, plot_path = output_dir / RESULTS_FILE, output_dir / PLOT_FILE
    results_error = attempt_write(RESULTS_FILE, results_path, lambda: write_results(records, results_path))
    first = records[0]
    print(f"\nmodel: {first['model']}")
    print(
        f"data:  {first['data']}: {first['num_train']} train / {first['num_held_out']} held-out records, "
        f"{len(first['labels'])} labels (chance {1 / len(first['labels']):.0%})"
    )
    print(
        f"{args.steps} steps of {args.batch_size}, AdamW lr {args.lr:g}; device {first['device']}"
        + (", 4-bit NF4 base" if args.load_in_4bit else "")
        + "\n"
    )
    print(table(records))
    if timing_problem:
        print(f"peft-sparse finetune: {timing_problem}", file=sys.stderr)
    return finish(
        records,
        results_path,
        results_error,
        None if args.no_plot else (plot, plot_path),
        not_written,
        time.perf_counter() - start,
        "peft-sparse finetune",
    )


def finish(
    records: list[dict],
    results_path: Path,
    results_error: str | None,
    plot_with,
    not_written: list[str],
    wall: float,
    prog: str,
) -> int:
    """The end of a comparison command, after its table: where the adapters and results went, the loss-curve plot
    (``plot_with``: ``(plot function, path)``, or ``None`` for none), the wall time, and the exit code (1 with one
    line naming what could not be written, 0 otherwise)."""
    saved = [r["adapter_dir"] for r in records if r["adapter_dir"]]
    print(
        f"\nadapters: {', '.join(saved) or 'none written'}; "
        f"results: {'not written' if results_error else results_path}"
    )
    not_written = not_written + ([results_error] if results_error else [])
    if plot_with is not None:
        plot_function, plot_path = plot_with
        plot_error = attempt_write(PLOT_FILE, plot_path, lambda: plot_function(records, plot_path))
        if plot_error:
            not_written.append(plot_error)
        else:
            print(f"loss curves: {plot_path}")
    print(f"wall time: {wall:.0f} s")
    if not_written:
        print(
            f"{prog}: error: could not write {'; '.join(not_written)}; the table above holds the results (exit "
            "code 1)",
            file=sys.stderr,
        )
        return 1
    return 0
