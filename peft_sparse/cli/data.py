"""Labelled text for ``peft-sparse finetune``: the built-in quotations data set, or the user's jsonl / csv / saved
``datasets`` folder, split into class-stratified train and held-out parts.

The built-in data are five of the Debian ``fortunes`` files (package ``fortunes``, source ``fortune-mod``, BSD
licence, ``/usr/share/doc/fortunes/copyright``): real quotations, labelled by the file they come from. Entries are
separated by lines holding only ``%``; attribution lines (``-- Author, "Episode"``) are removed so that a model has
to read the quotation itself (the Star Trek ones would otherwise give the answer away), and only short entries are
kept so that sequences, and the run, stay short.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

FORTUNES_DIR = Path("/usr/share/games/fortunes")  # apt-get install fortunes
CATEGORIES = ("computers", "food", "love", "politics", "startrek")
MIN_CHARS, MAX_CHARS = 20, 200  # after removing attributions and collapsing whitespace


class DataError(ValueError):
    """The data cannot be read or has the wrong shape; the message names the file and the field."""


@dataclass
class LabelledText:
    train: list[tuple[str, int]]
    held_out: list[tuple[str, int]]
    label_names: list[str]
    source: str


def read_fortunes(category: str, directory: Path = FORTUNES_DIR) -> list[str]:
    """Short quotations of one fortune file, attributions removed, whitespace collapsed, duplicates dropped."""
    path = Path(directory) / category
    if not path.is_file():
        raise DataError(f"{path} not found: install the quotations with `apt-get install -y fortunes`")
    text = path.read_text(encoding="utf-8", errors="replace")
    entries, seen = [], set()
    for raw in re.split(r"^%[ \t]*$", text, flags=re.MULTILINE):
        lines = [line for line in raw.splitlines() if not line.strip().startswith("--")]
        entry = " ".join(" ".join(lines).split())
        if MIN_CHARS <= len(entry) <= MAX_CHARS and entry not in seen:
            seen.add(entry)
            entries.append(entry)
    return entries


def fortunes_records(directory: Path = FORTUNES_DIR) -> list[tuple[str, str]]:
    """(quotation, category) for every kept entry of the five built-in categories."""
    return [(text, category) for category in CATEGORIES for text in read_fortunes(category, directory)]


def read_records(path: str | Path, text_field: str = "text", label_field: str = "label") -> list[tuple[str, str]]:
    """(text, label) pairs from a ``.jsonl`` / ``.json`` (one object per line), ``.csv`` file, or a folder written
    by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` uses its ``train`` split). Labels may be strings or
    integers; they are compared as strings."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"--data {str(path)!r} does not exist")
    if path.is_dir():
        rows = _rows_from_disk(path)
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise DataError(f"--data {str(path)!r}: line {number} is not JSON ({err.msg})") from None
    elif path.suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise DataError(f"--data {str(path)!r}: expected a .jsonl, .json or .csv file or a save_to_disk folder")
    records = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(f"--data {str(path)!r}: record {number} is a {type(row).__name__}, not an object")
        missing = [name for name in (text_field, label_field) if name not in row]
        if missing:
            raise DataError(f"--data {str(path)!r}: record {number} has no field {missing[0]!r} "
                            f"(its fields: {sorted(row)})")
        text, label = row[text_field], row[label_field]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"--data {str(path)!r}: record {number} field {text_field!r} is not a non-empty string")
        records.append((text, str(label)))
    if not records:
        raise DataError(f"--data {str(path)!r} holds no records")
    return records


def _rows_from_disk(path: Path) -> list[dict]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dev/trl dependency
        raise DataError(f"--data {str(path)!r} is a folder: reading it needs `pip install datasets`") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises FileNotFoundError or its own errors for a foreign folder
        raise DataError(f"--data {str(path)!r} is not a datasets.save_to_disk folder ({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"--data {str(path)!r}: a DatasetDict without a 'train' split ({list(loaded)})")
        loaded = loaded["train"]
    return list(loaded)


def split(records: list[tuple[str, str]], max_examples: int, seed: int, held_out_fraction: float = 0.25,
          source: str = "") -> LabelledText:
    """A class-balanced, stratified train / held-out split of at most ``max_examples`` records, fixed by ``seed``.

    Each label keeps at most ``max_examples // num_labels`` records, a ``held_out_fraction`` of them (at least one)
    held out. Label ids follow the sorted label names (numerically for integer labels); the built-in categories
    keep their order."""
    by_label: dict[str, list[str]] = defaultdict(list)
    for text, label in records:
        by_label[label].append(text)
    if set(by_label) == set(CATEGORIES):
        names = list(CATEGORIES)
    elif all(name.lstrip("-").isdigit() for name in by_label):  # integer labels keep their numeric order
        names = sorted(by_label, key=int)
    else:
        names = sorted(by_label)
    if len(names) < 2:
        raise DataError(f"the data need at least two distinct labels, found {names}")
    small = [name for name in names if len(by_label[name]) < 2]
    if small:
        raise DataError(f"label {small[0]!r} has {len(by_label[small[0]])} record(s); every label needs at least 2 "
                        "(one to train on, one held out)")
    per_label = max_examples // len(names)
    if per_label < 2:
        raise DataError(f"--max-examples {max_examples} leaves fewer than 2 records for each of {len(names)} labels")
    rng = random.Random(seed)
    train, held_out = [], []
    for label_id, name in enumerate(names):
        texts = list(by_label[name])
        rng.shuffle(texts)
        texts = texts[:per_label]
        num_held_out = min(len(texts) - 1, max(1, round(held_out_fraction * len(texts))))
        held_out += [(text, label_id) for text in texts[:num_held_out]]
        train += [(text, label_id) for text in texts[num_held_out:]]
    rng.shuffle(train)
    return LabelledText(train, held_out, names, source)


def load(data: str | None, max_examples: int, seed: int) -> LabelledText:
    """The built-in quotations (``data=None``) or the user's file, split for training."""
    if data is None:
        return split(fortunes_records(), max_examples, seed,
                     source=f"Debian fortunes quotations ({FORTUNES_DIR}/{{{','.join(CATEGORIES)}}})")
    return split(read_records(data), max_examples, seed, source=str(data))
