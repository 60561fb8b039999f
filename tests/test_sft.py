"""``peft-sparse sft``: TRL's arguments and ours, the data formats TRL trains on, completion-only masking, the LoRA
comparison, saved adapters, 4-bit and sparse + low-rank runs, on a tiny Llama with a chat template built here."""

from __future__ import annotations

import argparse
import json
import re
import statistics

import pytest
import torch

from _peft_sparse_cli import main  # the console script's entry point
from peft_sparse import SparseLayer
from peft_sparse.cli import compare, sft

# (inflected form, dictionary form): the tiny model learns them; one-word answers, as the built-in base_form task.
PAIRS = [
    ("mice", "mouse"),
    ("geese", "goose"),
    ("feet", "foot"),
    ("teeth", "tooth"),
    ("went", "go"),
    ("ran", "run"),
    ("sang", "sing"),
    ("swam", "swim"),
    ("best", "good"),
    ("worse", "bad"),
    ("oxen", "ox"),
    ("men", "man"),
]
QUESTION = "what is the dictionary form of {} ?"
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
# A chat template in the style of ChatML; words are separated by spaces, as the word-level tokenizer splits them.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
FAST = [
    "--max_steps",
    "2",
    "--per_device_train_batch_size",
    "4",
    "--eval_strategy",
    "no",
    "--logging_steps",
    "1",
    "--salience_batches",
    "2",
    "--eval_fraction",
    "0.25",
]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


ROWS = {  # the same examples in each format TRL's SFTTrainer takes
    "prompt_completion": [
        {"prompt": user(QUESTION.format(a)), "completion": assistant(b), "task": "base_form", "answer": b}
        for a, b in PAIRS * 2
    ],
    "standard_prompt_completion": [
        {"prompt": QUESTION.format(a), "completion": f" {b}", "answer": b} for a, b in PAIRS * 2
    ],
    "messages": [{"messages": user(QUESTION.format(a)) + assistant(b), "answer": b} for a, b in PAIRS * 2],
    "text": [{"text": f"{QUESTION.format(a)} {b}"} for a, b in PAIRS * 2],
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 2-layer Llama (64-wide: bitsandbytes' 4-bit block) and a word-level tokenizer with a chat template."""
    from tiny_models import save_tiny_chat_llama

    words = {w for a, b in PAIRS for w in (a, b)} | set(QUESTION.split()) | {"user", "assistant"}
    return save_tiny_chat_llama(tmp_path_factory.mktemp("tiny-llama"), words, SPECIALS, CHAT_TEMPLATE)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def cli(*argv) -> int:
    """``peft-sparse *argv`` in this process: its exit code, whether returned or raised (argparse exits)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:
        code = exit_info.code
    return code


# ------------------------------------------------------------------------------------------------ arguments


def sft_help(capsys, flag: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["sft", flag])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


OUR_OPTIONS = (
    "--density",
    "--num_tunable_weights",
    "--selection",
    "--update",
    "--sparse_target_modules",
    "--sparse_r",
)
OUR_OPTIONS += ("--compare", "--compare_learning_rate", "--eval_fraction", "--max_eval_examples", "--verbose")
COMMON_TRL = ("--model_name_or_path", "--dataset_name", "--dataset_test_split", "--learning_rate", "--max_steps")
COMMON_TRL += ("--per_device_train_batch_size", "--max_length", "--output_dir", "--load_in_4bit", "--lora_r")
COMMON_TRL += ("--lora_alpha", "--lora_target_modules", "--assistant_only_loss", "--config", "--help-all")
RARE_TRL = ("--dataset_train_split", "--completion_only_loss", "--use_dora", "--adam_beta2", "--torch_compile")


def test_help_puts_our_options_first_and_help_all_lists_every_trl_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "sft" in capsys.readouterr().out
    text = sft_help(capsys, "--help")
    everything = sft_help(capsys, "--help-all")
    ours, trl = text.index("peft-sparse options"), text.index("TRL options most runs set")
    for option in OUR_OPTIONS:
        assert ours < text.index(f"\n  {option}\n") < trl, option
    for option in COMMON_TRL:
        assert f"{option}" in text[trl:], option
    for option in RARE_TRL:
        assert f"\n  {option}\n" not in text and f"\n  {option}\n" in everything, option
    assert len(text.splitlines()) < 200 < len(everything.splitlines())
    assert "--worker" not in everything
    # every option the parser takes is listed by --help-all (dashed spellings and --no_ negations aside)
    listed = set(re.findall(r"^  (--\S+)$", everything, re.MULTILINE))
    taken = {action.option_strings[0] for action in sft.make_parser()._actions if action.help != argparse.SUPPRESS}
    assert {option for option in taken if not option.startswith("--no_")} - {"-h"} <= listed | {"--help"}
    # TRL's help strings that contradict this command are corrected
    assert "Works only with LoRA" not in everything and "QLoRA" in text
    assert "Of the LoRA baseline" in everything.split("\n  --use_dora\n")[1].split("\n  --")[0]


def test_defaults_suit_a_cpu_and_yaml_then_flags_override_them(tmp_path):
    script_args, training_args, model_args, sparse_args = sft.parse([])
    assert (model_args.model_name_or_path, script_args.dataset_name) == ("smollm2", "wordnet")
    assert (training_args.learning_rate, training_args.max_steps) == (sft.DEFAULT_LEARNING_RATE, sft.DEFAULT_MAX_STEPS)
    assert (model_args.lora_r, model_args.lora_alpha, training_args.output_dir) == (8, 16, "outputs/sft")
    assert sparse_args.sparse_target_modules == "all-linear" and sparse_args.compare is None
    if not torch.cuda.is_available():
        assert not training_args.bf16 and not training_args.gradient_checkpointing
        assert sparse_args.salience_batches == 8

    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 7\nlora_r: 4\nselection: magnitude\nlearning_rate: 0.01\n")
    _, training_args, model_args, sparse_args = sft.parse(["--config", str(config), "--learning_rate", "0.02"])
    assert (training_args.max_steps, model_args.lora_r, sparse_args.selection) == (7, 4, "magnitude")
    assert training_args.learning_rate == 0.02  # the flag wins over the file


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--density", "2"], "--density must be in (0, 1], got 2.0"),
        (["--max_steps", "0"], "--max_steps must be >= 1"),
        (["--max_steps", "many"], "argument --max_steps/--max-steps: invalid int value: 'many'"),
        (["--learning_rate", "-1"], "--learning_rate must be a finite number"),
        (["--learning_rate", "nan"], "--learning_rate must be a finite number"),
        (["--compare_learning_rate", "inf"], "--compare_learning_rate must be a finite number"),
        (["--lora_r", "0"], "--lora_r must be >= 1, got 0"),
        (["--selection", "psychic"], "argument --selection: invalid choice: 'psychic'"),
        (["--compare", "dora"], "argument --compare: invalid choice: 'dora'"),
        (["--eval_fraction", "1"], "--eval_fraction must be in (0, 1), got 1.0"),
        (["--sparse_r", "-1"], "--sparse_r must be >= 0, got -1"),
        (["--sparse_low_rank_lr_ratio", "0"], "--sparse_low_rank_lr_ratio must be > 0, got 0.0"),
        (["--num_tunable_weights", "0"], "--num_tunable_weights must be >= 1, got 0"),
        (["--density", "0.1", "--compare", "lora"], "--compare lora trains both adapters at LoRA rank --lora_r's"),
        (["--load_in_8bit", "--load_in_4bit"], "You can't use 8 bit and 4 bit precision at the same time"),
        (["--bogus_flag", "1"], "['--bogus_flag', '1']"),
        (["--config", "{tmp}/missing.yaml"], "missing.yaml"),
        (["--dataset_name", "trl-lib/Capybara"], "--dataset_name 'trl-lib/Capybara' is neither 'wordnet'"),
        (["--dataset_name", "{tmp}/missing.jsonl"], "--dataset_name '{tmp}/missing.jsonl' is neither"),
        (["--dataset_name", "{tmp}/fields.jsonl"], "its fields: 'question', 'reply'"),
        (["--dataset_name", "{tmp}/broken.jsonl"], "--dataset_name '{tmp}/broken.jsonl': line 2 is not JSON"),
        (["--dataset_name", "{tmp}/mixed.jsonl"], "line 2 has the fields ['prompt'], line 1 has ['text']"),
        (["--dataset_name", "{tmp}/data.csv"], "--dataset_name '{tmp}/data.csv': expected a .jsonl or .json file"),
        (
            ["--dataset_name", "{tmp}/good.jsonl", "--dataset_test_split", "dev"],
            "--dataset_test_split 'dev' is not a split of",
        ),
        (
            ["--dataset_name", "{tmp}/good.jsonl", "--model_name_or_path", "{tmp}/no-model"],
            "--model_name_or_path '{tmp}/no-model'",
        ),
    ],
)
def test_bad_arguments_give_one_line_naming_the_option_and_exit_code_2(argv, named, tmp_path, capsys):
    write_jsonl(tmp_path / "fields.jsonl", [{"question": "a", "reply": "b"}])
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\nnot json\n')
    write_jsonl(tmp_path / "mixed.jsonl", [{"text": "a"}, {"prompt": "b"}])
    (tmp_path / "data.csv").write_text("text\na\n")
    write_jsonl(tmp_path / "good.jsonl", ROWS["text"])
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli("sft", *argv, "--output_dir", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("peft-sparse sft: error:") and named.format(tmp=tmp_path) in err, err
    assert not (tmp_path / "out").exists()  # refused before anything ran


# ------------------------------------------------------------------------------------------------ data and masking


def trainer_for(tiny_dir, data_path, *extra):
    script_args, training_args, model_args, sparse_args = sft.parse(
        ["--model_name_or_path", str(tiny_dir), "--dataset_name", str(data_path), *FAST, *map(str, extra)]
    )
    data = sft.load_data(script_args, training_args.seed, sparse_args.eval_fraction, sparse_args.max_eval_examples)
    return sft.build_trainer("sparse", training_args, model_args, sparse_args, data)[0]


def test_trl_masks_the_prompt_of_prompt_completion_data_and_trains_on_all_of_text(tiny_dir, tmp_path):
    trainer = trainer_for(
        tiny_dir, write_jsonl(tmp_path / "pc.jsonl", ROWS["prompt_completion"]), "--output_dir", tmp_path / "out"
    )
    tokenizer = trainer.processing_class
    answers = {tokenizer.convert_tokens_to_ids(b) for _, b in PAIRS}
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        n = int(mask.sum())
        trained = (labels[:n] != -100).nonzero().flatten().tolist()
        # Only the completion is trained on: the answer and the end-of-turn token, the last two real tokens.
        assert trained == [n - 2, n - 1], tokenizer.decode(ids[:n])
        assert int(labels[n - 2]) in answers and int(labels[n - 1]) == tokenizer.eos_token_id
        assert torch.equal(labels[trained], ids[trained]) and (labels[n:] == -100).all()

    trainer = trainer_for(
        tiny_dir, write_jsonl(tmp_path / "text.jsonl", ROWS["text"]), "--output_dir", tmp_path / "out"
    )
    batch = next(iter(trainer.get_train_dataloader()))
    real = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])  # every real token is trained on
    assert (batch["labels"][~real] == -100).all()


@pytest.mark.parametrize(
    "data_format", ["prompt_completion", "standard_prompt_completion", "messages", "text", "save_to_disk"]
)
def test_each_data_format_trains_and_writes_an_adapter(data_format, tiny_dir, tmp_path, capsys):
    import datasets

    if data_format == "save_to_disk":  # a DatasetDict with its own test split
        data_path = tmp_path / "saved"
        datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_list(ROWS["prompt_completion"][:18]),
                "test": datasets.Dataset.from_list(ROWS["prompt_completion"][18:]),
            }
        ).save_to_disk(str(data_path))
    else:
        data_path = write_jsonl(tmp_path / f"{data_format}.jsonl", ROWS[data_format])
    out = tmp_path / "out"
    assert cli("sft", "--model_name_or_path", tiny_dir, "--dataset_name", data_path, *FAST, "--output_dir", out) == 0
    stdout = capsys.readouterr().out
    (record,) = json.loads((out / "results.json").read_text())
    assert (out / "sparse" / "adapter" / "adapter_config.json").is_file()
    assert record["steps"] == 2 and record["train_tokens"] > 0 and record["trainable"] > 0
    assert record["num_held_out"] == 6  # the saved test split, or --eval_fraction 0.25 of 24 rows
    scored = data_format != "text"  # rows with an answer and a prompt to generate from
    assert (record["exact_match"] is not None) == scored and ("exact match" in stdout) == scored
    assert "| sparse, random mask, + rank 4 |" in stdout and (out / "loss_curves.png").is_file()  # --lora_r 8 / 2


def test_rows_whose_completion_is_truncated_away_are_counted_or_refused(tiny_dir, tmp_path, capsys):
    """TRL drops rows whose completion lies beyond --max_length: say so in one line; with no row left, refuse in one
    (it used to end in a KeyError: 'eval_loss' or a ValueError from RandomSampler)."""
    long_prompt = " ".join([QUESTION.format(a) for a, _ in PAIRS] * 3)
    rows = [
        {"prompt": user(long_prompt if i % 2 else QUESTION.format(a)), "completion": assistant(b), "answer": b}
        for i, (a, b) in enumerate(PAIRS * 2)
    ]
    data = write_jsonl(tmp_path / "half_long.jsonl", rows)
    argv = ("sft", "--model_name_or_path", tiny_dir, *FAST, "--max_length", 24)
    assert cli(*argv, "--dataset_name", data, "--output_dir", tmp_path / "a") == 0
    err = capsys.readouterr().err
    assert re.search(r"sft \(sparse\): \d+ of \d+ training row\(s\) were dropped: .*--max_length 24", err), err
    every = write_jsonl(tmp_path / "all_long.jsonl", [dict(row, prompt=user(long_prompt)) for row in rows])
    assert cli(*argv, "--dataset_name", every, "--output_dir", tmp_path / "b") == 2
    err = capsys.readouterr().err
    assert "error:" in err and "row(s) were dropped" in err and "raise --max_length" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------------------------------------ whole runs


@pytest.mark.slow
def test_compare_lora_trains_both_at_the_same_count_in_their_own_processes(tiny_dir, tmp_path, cli_here):
    out = tmp_path / "out"
    data_path = write_jsonl(tmp_path / "pc.jsonl", ROWS["prompt_completion"])
    result = cli_here(
        "sft",
        "--model_name_or_path",
        tiny_dir,
        "--dataset_name",
        data_path,
        *FAST,
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "1",
        "--compare",
        "lora",
        "--lora_r",
        "4",
        "--compare_learning_rate",
        "5e-4",
        "--output_dir",
        out,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sparse, lora = json.loads((out / "results.json").read_text())
    assert (sparse["method"], lora["method"]) == ("sparse", "lora")
    # LoRA rank 4 on every linear layer but the head: 4 * (in + out) for q, k, v, o, gate, up and down, 2 layers
    assert sparse["trainable"] == lora["trainable"] == 2 * 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192) == 8192
    assert (sparse["learning_rate"], lora["learning_rate"]) == (sft.DEFAULT_LEARNING_RATE, 5e-4)
    for record in (sparse, lora):
        assert (out / record["method"] / "adapter" / "adapter_config.json").is_file()
        assert record["peak_memory_mb"] > 0 and record["train_tokens"] > 0
        # every optimizer step timed (2 of them, --max_steps), the median over those after the first
        assert len(record["step_seconds"]) == record["steps"] == 2 and min(record["step_seconds"]) > 0
        assert record["step_seconds_median"] == statistics.median(record["step_seconds"][1:])
        # before training and after each step (--eval_steps 1): the last is the held-out loss after training
        evaluations = [e for e in record["log_history"] if "eval_loss" in e]
        assert [e["step"] for e in evaluations] == [0, 1, 2]
        assert (evaluations[0]["eval_loss"], evaluations[-1]["eval_loss"]) == (
            record["eval_loss_before"],
            record["eval_loss_after"],
        )
        assert f"{record['eval_loss_before']:.3f} -> {record['eval_loss_after']:.3f}" in result.stdout
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 4 and table[2].startswith("| sparse, random mask, + rank 2 | 8,192 |")  # --lora_r 4 / 2
    assert table[3].startswith("| LoRA r=4 | 8,192 |") and "x LoRA)" in table[2]
    # step times taken side by side in one more process (sft.time_steps): LoRA against itself is exactly 1
    assert lora["step_time_vs_lora"] == 1.0 and sparse["timing_rounds"] == compare.TIMING_ROUNDS
    interleaved = f"{sparse['step_seconds_interleaved'] * 1e3:,.0f} ms ({sparse['step_time_vs_lora']:.2f}x LoRA)"
    assert interleaved in table[2] and "timed side by side in one process" in result.stdout
    assert "step time, median" in table[0]
    assert "exact match (6 held-out rows)" in table[0]
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_saved_sparse_adapter_reloads_with_the_trained_logits(tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    args = sft.parse(
        [
            "--model_name_or_path",
            str(tiny_dir),
            "--dataset_name",
            str(write_jsonl(tmp_path / "pc.jsonl", ROWS["prompt_completion"])),
            *FAST,
            "--learning_rate",
            "0.05",
            "--sparse_target_modules",
            "q_proj",
            "v_proj",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    record, trainer = sft.train_one("sparse", *args)
    # LoRA rank 8's count on the same layers: 8 * (in + out) for q (64 x 64) and v (32 x 64), in 2 layers
    assert record["trainable"] == 2 * 8 * (128 + 96)
    adapted = {
        name.rsplit(".", 1)[-1] for name, module in trainer.model.named_modules() if isinstance(module, SparseLayer)
    }
    assert adapted == {"q_proj", "v_proj"}
    batch = {k: v for k, v in next(iter(trainer.get_eval_dataloader())).items() if k != "labels"}
    trained = trainer.model.eval()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), record["adapter_dir"]).eval()
    with torch.no_grad():
        expected, actual = trained(**batch).logits, reloaded(**batch).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()(**batch).logits
    assert torch.allclose(actual, expected, atol=1e-5)
    assert not torch.allclose(base, expected, atol=1e-3)  # the adapter changed something


def test_a_quantised_base_trains_sparse_and_qlora(tiny_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    args = sft.parse(
        [
            "--model_name_or_path",
            str(tiny_dir),
            "--dataset_name",
            str(write_jsonl(tmp_path / "pc.jsonl", ROWS["prompt_completion"])),
            *FAST,
            "--load_in_4bit",
            "--update",
            "spiel",
            "--update_interval",
            "1",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    import bitsandbytes as bnb

    counts = {}
    for method in ("sparse", "lora"):
        record, trainer = sft.train_one(method, *args)
        assert record["quantization"] == "4-bit NF4, double quantisation" and trainer.model.is_loaded_in_4bit
        # Evaluating and generating left the weights in bitsandbytes' standard layout, the one training backprops
        # through (its AVX512-BF16 inference layout has no backward).
        layers = [m for m in trainer.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
        assert all(torch.isfinite(torch.tensor([record["eval_loss_before"], record["eval_loss_after"]])))
        assert (tmp_path / "out" / method / "adapter" / "adapter_config.json").is_file()
        counts[method] = record["trainable"]
    assert counts["sparse"] == counts["lora"]

    args = sft.parse(
        [
            "--model_name_or_path",
            str(tiny_dir),
            "--dataset_name",
            str(tmp_path / "pc.jsonl"),
            *FAST,
            "--load_in_8bit",
            "--learning_rate",
            "1e-2",
            "--output_dir",
            str(tmp_path / "out8"),
        ]
    )
    record, trainer = sft.train_one("sparse", *args)
    assert record["quantization"] == "8-bit" and trainer.model.is_loaded_in_8bit
    assert record["trainable"] == counts["sparse"] and record["eval_loss_after"] < record["eval_loss_before"]


def test_sparse_plus_low_rank_keeps_lora_rs_total(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    import peft_sparse

    args = sft.parse(
        [
            "--model_name_or_path",
            str(tiny_dir),
            "--dataset_name",
            str(write_jsonl(tmp_path / "pc.jsonl", ROWS["prompt_completion"])),
            *FAST,
            "--sparse_r",
            "2",
            "--output_dir",
            str(tmp_path / "out"),
        ]
    )
    record, trainer = sft.train_one("sparse", *args)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert record["trainable"] == peft_sparse.lora_equivalent_budget(base, r=8, target_modules="all-linear")
    low_rank = sum(p.numel() for n, p in trainer.model.named_parameters() if p.requires_grad and "sparse_lora_" in n)
    assert low_rank == peft_sparse.lora_equivalent_budget(base, r=2, target_modules="all-linear")
    assert trainer.model.peft_config["default"].r == 2


def test_the_sparse_options_are_the_configs_fields():
    """One source of truth: every --option that sets a SparseConfig field has that field's help, choices and default
    (or a default the command declares in COMMAND_DEFAULTS), and reaches the config the command builds."""
    import dataclasses
    import typing

    from peft_sparse import SparseConfig
    from peft_sparse.cli.sft import arguments

    config_fields = {f.name: f for f in dataclasses.fields(SparseConfig)}
    option_fields = {f.name: f for f in dataclasses.fields(arguments.SparseArguments)}
    for option, name in arguments.CONFIG_FIELDS.items():
        source, mirrored = config_fields[name], option_fields[option]
        assert mirrored.metadata["help"].startswith(source.metadata["help"]), option
        expected = arguments.COMMAND_DEFAULTS.get(option, source.default)
        assert mirrored.default == expected, option
        literal = typing.get_args(typing.get_type_hints(SparseConfig)[name])
        if "choices" in mirrored.metadata:
            assert literal and set(mirrored.metadata["choices"]) == set(literal), option
    # every option the mapping names exists, and no sparse option that is a config field is left out of it
    assert set(arguments.CONFIG_FIELDS) <= set(option_fields)
    assert not {name for name in option_fields if name in config_fields} - set(arguments.CONFIG_FIELDS)


@pytest.mark.parametrize(
    ("argv", "rank"),
    [
        ([], 4),  # half of the default --lora_r 8: the hybrid at LoRA's count
        (["--lora_r", "5"], 2),
        (["--lora_r", "1"], 0),
        (["--sparse_r", "0"], 0),  # the plain sparse adapter, asked for
        (["--sparse_r", "3"], 3),
        (["--density", "0.01"], 0),  # a count of its own: no low-rank term unless asked for
        (["--num_tunable_weights", "1000"], 0),
    ],
)
def test_the_low_rank_term_defaults_to_half_of_loras_rank_where_the_count_follows_it(argv, rank):
    from tiny_models import tiny_llama

    from peft_sparse import lora_equivalent_budget
    from peft_sparse.cli.sft import model as sft_model

    _, _, model_args, sparse_args = sft.parse(argv)
    assert sparse_args.sparse_r == rank
    base = tiny_llama()
    config = sft_model.sparse_config(base, model_args, sparse_args, seed=0)
    assert config.r == rank and config.selection == "random" and config.low_rank_lr_ratio == 0.3
    if not argv or argv[0] == "--lora_r":  # the count follows --lora_r: the term comes off the entries
        lora = lora_equivalent_budget(base, r=model_args.lora_r, target_modules="all-linear", task_type="CAUSAL_LM")
        term = lora_equivalent_budget(base, r=rank, target_modules="all-linear", task_type="CAUSAL_LM") if rank else 0
        assert config.num_tunable_weights == lora - term


@pytest.mark.parametrize(
    ("argv", "ratio"),
    [
        ([], 0.3),  # the default random mask: values at 1e-2, the term at LoRA's 3e-3
        (["--selection", "gradient"], 3.0),  # a salience-chosen mask: values at 1e-3, the term at 3e-3
        (["--selection", "magnitude"], 3.0),
        (["--sparse_low_rank_lr_ratio", "2"], 2.0),  # given: kept, whatever the mask
        (["--selection", "gradient", "--sparse_low_rank_lr_ratio", "0.5"], 0.5),
    ],
)
def test_the_low_rank_terms_rate_ratio_defaults_by_mask(argv, ratio):
    from tiny_models import tiny_llama

    from peft_sparse.cli.sft import model as sft_model

    _, training_args, model_args, sparse_args = sft.parse(argv)
    assert training_args.learning_rate == sft.DEFAULT_LEARNING_RATE == 1e-2
    config = sft_model.sparse_config(tiny_llama(), model_args, sparse_args, seed=0)
    assert config.low_rank_lr_ratio == ratio


def test_each_sparse_option_reaches_the_config_the_command_builds():
    from tiny_models import tiny_llama

    from peft_sparse.cli.sft import model as sft_model

    given = {
        "budget": "global",
        "selection": "fisher",
        "update": "dynamic",
        "update_interval": 7,
        "salience_batches": 3,
        "selection_max_memory": 123456789,
        "regrow": "momentum",
        "sparse_r": 2,
        "sparse_lora_alpha": 5.0,
        "sparse_low_rank_lr_ratio": 3.0,
        "num_tunable_weights": 100,
    }
    argv = [token for option, value in given.items() for token in (f"--{option}", str(value))]
    _, _, model_args, sparse_args = sft.parse(argv)
    config = sft_model.sparse_config(tiny_llama(), model_args, sparse_args, seed=3)
    for option, name in sft.arguments.CONFIG_FIELDS.items():
        if option in given:
            assert getattr(config, name) == given[option], option
    assert config.seed == 3 and config.effective_accumulation_steps == 5  # min(5, update_interval), the config's rule
