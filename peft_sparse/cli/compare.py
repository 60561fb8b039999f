"""The side-by-side comparison both commands run (``peft-sparse finetune`` and ``peft-sparse sft --compare``).

Each method trains in its own Python process, a *worker* (the command re-invoked with ``--worker METHOD``), so that
its peak memory is its own and nothing one run leaves behind (allocator caches, autograd state) tilts the next. A
worker sends its run's record back as JSON on its stdout (not through a file, so that a full disk cannot lose it).
Then one more worker (``--worker timing``) loads every saved adapter and times their steps side by side, so that the
step-time ratios hold on a machine whose load changes. The parent prints the command's table, writes
``results.json`` and ``loss_curves.png`` next to the adapters, and names in one line on stderr whatever could not be
written (exit code 1).

This module holds what both commands share: :func:`run` (the comparison from the output folder to the exit code, to
which each command gives only what differs: its methods, its header, table and plot), the worker protocol, the
output-folder checks, peak memory, the timing, the writing of results and plots.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .._memory import peak_memory_bytes
from .common import USAGE_ERROR

RESULTS_FILE, PLOT_FILE = "results.json", "loss_curves.png"
WORKER_FLAG = "--worker"  # internal: run one method (or the timing) and write its record to stdout as JSON

TIMING_WORKER = "timing"

TIMING_ROUNDS = 6


def split_worker(argv: list[str]) -> tuple[str | None, list[str]]:
    """``(worker, argv without --worker WORKER)``: the method a worker process runs (None in the parent), taken out
    before the command's own parser sees the arguments. A ``--worker`` without a value gives ``("", argv)``."""
    if WORKER_FLAG not in argv:
        return None, list(argv)
    at = argv.index(WORKER_FLAG)
    return (argv[at + 1] if at + 1 < len(argv) else ""), argv[:at] + argv[at + 2 :]


def worker_problem(worker: str, methods: list[str]) -> str | None:
    """Why ``worker`` is not a worker of this run (one of ``methods``, or the timing), or None."""
    if worker in (*methods, TIMING_WORKER):
        return None
    return f"{WORKER_FLAG} (internal) takes one of {[*methods, TIMING_WORKER]}, got {worker!r}"


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


def peak_memory_mb(device: str) -> float:
    """Peak allocated CUDA memory, or on CPU the process's peak resident set (:mod:`peft_sparse._memory`), in MiB."""
    peak = peak_memory_bytes(device)
    return float("nan") if peak is None else peak / 2**20


@dataclass
class Comparison:
    """What a command gives :func:`run`: the parts of the comparison that differ between commands."""

    command: str  # "finetune" or "sft": the workers are `peft-sparse COMMAND ARGV --worker METHOD`
    argv: list[str]  # the command's own arguments, which the workers get again
    methods: list[str]  # the runs, in order (workers' names)
    output_dir: Path
    output_option: str  # the option naming the output folder, for the error when it cannot be created
    header: Callable[[list[dict]], str]  # the lines above the table (model, data, schedule)
    table: Callable[[list[dict]], str]
    plot: Callable[[list[dict], Path], None] | None  # None: no plot
    error: type[Exception]  # what a problem found once under way is raised as (a usage error, exit code 2)
    in_process: Callable[[], dict] | None = None  # one method trained in this process instead of a worker
    note: Callable[[list[dict]], str | None] = lambda records: None  # printed after the table

    @property
    def prog(self) -> str:
        return f"peft-sparse {self.command}"


def run(comparison: Comparison) -> int:
    """The comparison a command runs, after its arguments are checked: create the output folder, train each method
    in its own worker process (or ``in_process``), time the steps side by side, write ``results.json``, print the
    header, the table and the note, write the plot, and return the exit code (:func:`finish`)."""
    start = time.perf_counter()
    try:
        comparison.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # what the argument checks cannot see (a read-only file system, a race)
        raise comparison.error(
            f"{comparison.output_option} {str(comparison.output_dir)!r} cannot be created ({err.strerror or err})"
        ) from None
    timing_problem = None
    if comparison.in_process is not None:
        records = [comparison.in_process()]
    else:  # each in its own process, so that each peak memory is its own
        code, records = run_workers(comparison.command, comparison.argv, comparison.methods)
        if code != 0:
            return code
        timing_problem = add_interleaved_step_times(records, comparison.command, comparison.argv, comparison.methods)
    not_written = [r["adapter_error"] for r in records if r["adapter_error"]]
    results_path, plot_path = comparison.output_dir / RESULTS_FILE, comparison.output_dir / PLOT_FILE
    results_error = attempt_write(RESULTS_FILE, results_path, lambda: write_results(records, results_path))
    print("\n" + comparison.header(records) + "\n")
    print(comparison.table(records))
    note = comparison.note(records)
    if note:
        print("\n" + note)
    if timing_problem:
        print(f"{comparison.prog}: {timing_problem}", file=sys.stderr)
    plot_with = None if comparison.plot is None else (comparison.plot, plot_path)
    wall = time.perf_counter() - start
    return finish(records, results_path, results_error, plot_with, not_written, wall, comparison.prog)


def run_workers(command: str, argv: list[str], methods: list[str]) -> tuple[int, list[dict]]:
    """Run ``peft-sparse COMMAND ARGV --worker METHOD`` for each of ``methods`` in turn: ``(0, their records)``, or
    the exit code to end with (2 where a worker has said why in one line, e.g. a diverged loss; 1 where a worker
    failed otherwise, said here)."""
    records = []
    for method in methods:
        code, record = run_worker_process([command, *argv, WORKER_FLAG, method])
        if code == USAGE_ERROR:
            return USAGE_ERROR, []
        if code != 0:
            print(f"peft-sparse {command}: the {method} run failed (exit code {code})", file=sys.stderr)
            return 1, []
        records.append(record)
    return 0, records


def add_interleaved_step_times(records: list[dict], command: str, argv: list[str], methods: list[str]) -> str | None:
    """With LoRA and at least one other run (``records``, one per ``methods``, in order), time their steps side by
    side in one more worker (``--worker timing``, which runs :func:`interleaved_step_times` over every saved adapter)
    and add ``step_seconds_interleaved``, ``step_time_vs_lora`` and ``timing_rounds`` to the records. Returns why no
    ratio could be taken, or None (also when an adapter could not be saved: its own error line says so, and the
    table then shows no ratios)."""
    if "lora" not in methods or len(records) < 2:
        return None
    if any(not r["adapter_dir"] for r in records):
        return None
    code, timing = run_worker_process([command, *argv, WORKER_FLAG, TIMING_WORKER])
    if code != 0:
        return f"no step-time ratios: the side-by-side timing run failed (exit code {code})"
    for record, method in zip(records, methods, strict=True):
        record["step_seconds_interleaved"] = timing["step_seconds"][method]
        record["step_time_vs_lora"] = timing["vs_lora"][method]
        record["timing_rounds"] = timing["rounds"]
    return None


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


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
