"""``peft-sparse sft``: supervised fine-tuning of a causal LM with a sparse adapter, in TRL's command-line conventions.

The arguments are TRL's own (``trl.TrlParser`` over ``ScriptArguments``, ``SFTConfig`` and ``ModelConfig``, as
``trl sft`` builds them, so ``--config run.yaml`` works too) plus :class:`SparseArguments`. The run is TRL's
``SFTTrainer`` over ``get_peft_model(model, SparseConfig(...))`` with :class:`~peft_sparse.SparseTrainingCallback`;
TRL formats, tokenises and masks the data (completion-only or assistant-only loss), nothing here re-implements that.

Unless ``--density`` or ``--num_tunable_weights`` says otherwise, the sparse adapter trains exactly as many parameters
as a LoRA adapter of rank ``--lora_r`` would. ``--compare lora`` also trains that LoRA adapter, each method in its own
process (so that its peak memory is its own), and prints one table: trainable parameters, held-out loss before and
after, exact match of greedy generations where the data has an ``answer`` column, each run's median step time and peak
memory. Adapters go to ``<output_dir>/<method>/adapter``, next to ``results.json`` and ``loss_curves.png``.

The modules: :mod:`.arguments` (TRL's parser and ours), :mod:`.data`, :mod:`.model` (the model and both adapters'
configs), :mod:`.training` (one run, and the side-by-side timing), :mod:`.evaluation` (exact match) and
:mod:`.report`; the worker processes are :mod:`peft_sparse.cli.compare`'s. Defaults, examples and measured results:
README.md, "Fine-tuning a causal LM".
"""

from __future__ import annotations

import sys
from pathlib import Path

from .. import compare, models
from ..common import USAGE_ERROR
from .arguments import (
    COMPARE_METHODS,
    DEFAULT_LEARNING_RATE,
    DEFAULT_LORA_LEARNING_RATE,
    DEFAULT_MAX_STEPS,
    PROG,
    SftError,
    SparseArguments,
    check_arguments,
    make_parser,
    parse,
    planned_methods,
)
from .data import HeldOutData, load_data, run_data
from .evaluation import exact_match
from .model import load_model, lora_config, resolve_model, sparse_config
from .report import header, method_name, plot, table, timing_note
from .training import build_trainer, time_steps, train_one

__all__ = [
    "COMPARE_METHODS",
    "DEFAULT_LEARNING_RATE",
    "DEFAULT_LORA_LEARNING_RATE",
    "DEFAULT_MAX_STEPS",
    "PROG",
    "HeldOutData",
    "SftError",
    "SparseArguments",
    "build_trainer",
    "check_arguments",
    "exact_match",
    "header",
    "load_data",
    "load_model",
    "lora_config",
    "make_parser",
    "method_name",
    "parse",
    "planned_methods",
    "plot",
    "resolve_model",
    "run",
    "sparse_config",
    "table",
    "time_steps",
    "timing_note",
    "train_one",
]


def _quiet() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # loading bars; the training bar stays


def run(argv: list[str], worker: str | None = None) -> int:
    """``peft-sparse sft ARGV``: the exit code (2 with one line on stderr for a bad argument, data or model).
    ``worker``: the method a worker process runs (see :mod:`peft_sparse.cli.compare`), None in the parent."""
    argv = list(argv)
    script_args, training_args, model_args, sparse_args = parse(argv)
    problem = check_arguments(script_args, training_args, model_args, sparse_args)
    if problem is None and worker is not None:
        problem = compare.worker_problem(worker, planned_methods(sparse_args))
    if problem is not None:
        return _usage_error(problem)
    _quiet()
    try:
        if worker == compare.TIMING_WORKER:
            return compare.send_record(lambda: time_steps(script_args, training_args, model_args, sparse_args))
        if worker is not None:
            return compare.send_record(
                lambda: train_one(worker, script_args, training_args, model_args, sparse_args)[0]
            )
        return _run(argv, script_args, training_args, model_args, sparse_args)
    except (SftError, models.ModelNotFound) as err:
        return _usage_error(str(err))


def _usage_error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return USAGE_ERROR


def _run(argv, script_args, training_args, model_args, sparse_args) -> int:
    # Fail fast, here, on what each run would otherwise fail on.
    data = run_data(script_args, training_args, sparse_args)
    resolve_model(model_args)
    in_process = None
    if not sparse_args.compare:  # one method: in this process
        in_process = lambda: train_one("sparse", script_args, training_args, model_args, sparse_args, data)[0]
    return compare.run(
        compare.Comparison(
            command="sft",
            argv=argv,
            methods=planned_methods(sparse_args),
            output_dir=Path(training_args.output_dir),
            output_option="--output_dir",
            header=lambda records: header(records, training_args),
            table=table,
            plot=plot,
            error=SftError,
            in_process=in_process,
            note=timing_note,
        )
    )
