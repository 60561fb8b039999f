"""The ``peft-sparse`` command line: ``peft-sparse finetune`` (the main job), ``peft-sparse sft`` (supervised
fine-tuning of a causal LM through TRL, with TRL's arguments) and ``peft-sparse bench``.

Bad arguments, bad data, and problems found once a run is under way (an output folder that cannot be created, a
training loss that became inf or nan) end with one line on stderr naming the option or the field and the value, and
exit code 2 (argparse's convention); a failed run exits with 1, as does a run whose results could not all be written
(its table is still printed, and one line names what is missing).

A command prints its own output only: other packages' loggers show errors, their deprecation notices are hidden,
unless ``--verbose``. That is done by the one entry point, ``_peft_sparse_cli.main`` (the console script, and
``python -m peft_sparse.cli``), which quiets the imports too; :func:`main` here only dispatches.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .common import USAGE_ERROR, VERBOSE_HELP, Parser, add_verbose_argument

__all__ = ["USAGE_ERROR", "VERBOSE_HELP", "add_verbose_argument", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from . import bench, finetune

    parser = Parser(prog="peft-sparse", description="Sparse fine-tuning for Hugging Face peft (SPEFT, SpIEL).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    finetune_parser = commands.add_parser(
        "finetune",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="fine-tune a real pretrained model with a sparse adapter and with LoRA, and compare them",
        description="Fine-tune a pretrained model on labelled text with a sparse adapter (SPEFT/SpIEL) and with LoRA "
        "at the same trainable-parameter count, then print a comparison table (trainable parameters, "
        "train loss, held-out accuracy, step time, peak memory), save the adapters and plot the loss "
        "curves. With no arguments: MiniLM-L6 learns which of five Debian fortune files a quotation "
        "comes from, offline, on a CPU, in a few minutes.",
    )
    finetune.add_arguments(finetune_parser)
    bench_parser = commands.add_parser(
        "bench",
        help="run the benchmarks in benchmarks/ and print their ratio tables",
        description="Run benchmarks/ops_bench.py (kernels vs reference ops; a training step vs LoRA vs the frozen "
        "base) and benchmarks/qlora_bench.py (4-bit sparse vs QLoRA vs the frozen 4-bit base) and print "
        "their ratio tables. Needs a source checkout (benchmarks/ next to the package).",
    )
    bench.add_arguments(bench_parser)
    # Listed here for --help; `peft-sparse sft ...` is parsed by TRL's own parser (peft_sparse.cli.sft), see main().
    commands.add_parser(
        "sft",
        add_help=False,
        help="supervised fine-tuning of a causal LM with a sparse adapter through TRL's SFTTrainer, TRL's arguments "
        "(optionally compared with LoRA)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``peft-sparse ARGV``: dispatch to the command and return its exit code (run it through
    ``_peft_sparse_cli.main`` for the command's quiet output)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from . import compare

    # A worker process (see peft_sparse.cli.compare) is the command re-invoked with `--worker METHOD`, taken out
    # here, before the command's own parser sees the arguments.
    worker, argv = compare.split_worker(argv) if argv[:1] in (["sft"], ["finetune"]) else (None, argv)
    if argv[:1] == ["sft"]:
        from . import sft

        return sft.run(argv[1:], worker)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return USAGE_ERROR
    if args.command == "finetune":
        from . import data, finetune, models
        from .classification import TrainingDiverged

        problem = finetune.check_arguments(args)
        if problem is not None:
            parser.exit(USAGE_ERROR, f"peft-sparse finetune: error: {problem}\n")
        try:
            return finetune.run(args, argv[1:], worker)
        except (data.DataError, models.ModelNotFound, finetune.FinetuneError, TrainingDiverged) as err:
            parser.exit(USAGE_ERROR, f"peft-sparse finetune: error: {err}\n")
    from . import bench

    return bench.run(args)
