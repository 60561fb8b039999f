"""``peft-sparse bench``: run the scripts in ``benchmarks/`` and print their ratio tables.

The benchmarks live in the source checkout, not in the installed package (they write ``benchmarks/RESULTS.md``),
so this command finds them next to the package, as an editable install from a clone has them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from .common import add_verbose_argument

SCRIPTS = {
    "ops": "ops_bench.py",
    "qlora": "qlora_bench.py",
    "quality": "quality.py",
    "distributed": "distributed_bench.py",
    "memory": "memory.py",
    "sft_quality": "sft_quality.py",
    "capacity": "capacity.py",
    "model_steps": "model_steps.py",
    "spiel_vs_static": "spiel_vs_static.py",
    "mask_diagnosis": "mask_diagnosis.py",
    "suite": "suite.py",
    "salience_batches": "salience_batches.py",
    "selection_replay": "selection_replay.py",
}
ARGUMENTS = {
    "mask_diagnosis": ["stats"],
    "suite": ["run"],
    "salience_batches": ["run"],
}  # what a script needs besides --repeats / --write
TAKES_REPEATS = ("ops", "qlora")
PRINT_ONLY = ("spiel_vs_static", "mask_diagnosis")  # measurements printed, not written to RESULTS.md (no --write)
DEFAULT = ("ops", "qlora")


def benchmarks_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "benchmarks"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # No `choices`: Python 3.11's argparse checks an empty nargs="*" list against them and rejects it; run() checks.
    parser.add_argument(
        "which",
        nargs="*",
        metavar="BENCHMARK",
        help=f"which benchmarks to run, of {list(SCRIPTS)}; default {list(DEFAULT)} "
        "(quality trains 5 methods x 3 seeds: about 25 minutes on 2 CPU cores; distributed "
        "runs FSDP2 and DDP on 2 processes: about 1.5 minutes; sft_quality and capacity sweep 9 methods' rates "
        "over 3 seeds: hours on 2 CPU cores, resumable; suite sweeps 4 methods on 6 tasks: about 9 hours on 2 CPU "
        "cores, resumable from its committed records; salience_batches compares the masks of 1-64 salience batches: "
        "about 15 minutes; model_steps is meant for a GPU; spiel_vs_static and "
        "mask_diagnosis print their measurements and take no --write)",
    )
    add_verbose_argument(parser)
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repetitions per measurement (median) for ops and qlora; default: each script's own",
    )
    parser.add_argument("--write", action="store_true", help="also rewrite their sections of benchmarks/RESULTS.md")


def run(args: argparse.Namespace) -> int:
    unknown = [name for name in args.which if name not in SCRIPTS]
    if unknown:
        print(
            f"peft-sparse bench: error: unknown benchmark {unknown[0]!r} (choose from {list(SCRIPTS)})",
            file=sys.stderr,
        )
        return 2
    if args.repeats is not None and args.repeats < 1:
        print(f"peft-sparse bench: error: --repeats must be >= 1, got {args.repeats}", file=sys.stderr)
        return 2
    folder = benchmarks_dir()
    if not folder.is_dir():
        print(
            f"peft-sparse bench: error: {folder} not found; the benchmarks ship with the source checkout "
            "(git clone, then pip install -e .)",
            file=sys.stderr,
        )
        return 2
    # Each script runs through the console script's quiet wrapper: its own output only, as the other commands print.
    launcher = [] if args.verbose else ["-c", "import sys, _peft_sparse_cli; sys.exit(_peft_sparse_cli.run_script())"]
    for name in dict.fromkeys(args.which or DEFAULT):  # unique, in the given order
        script = [str(folder / SCRIPTS[name]), *ARGUMENTS.get(name, [])]
        if args.repeats is not None and name in TAKES_REPEATS:
            script += ["--repeats", str(args.repeats)]
        if args.write and name not in PRINT_ONLY:
            script.append("--write")
        print(f"==== {' '.join(script)}", flush=True)
        command = [sys.executable, *launcher, *script]
        completed = subprocess.run(command, check=False)
        if completed.returncode != 0:
            print(f"peft-sparse bench: {SCRIPTS[name]} failed (exit code {completed.returncode})", file=sys.stderr)
            return 1
    return 0
