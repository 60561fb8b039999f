"""Labelled text for ``peft-sparse finetune``: the built-in quotations data set, or the user's jsonl / csv / saved
``datasets`` folder, split into class-stratified train and held-out parts.

The built-in data are five of the Debian ``fortunes`` files (package ``fortunes``, source ``fortune-mod``, BSD
licence, ``/usr/share/doc/fortunes/copyright``): real quotations, labelled by the file they come from. Entries are
separated by lines holding only ``%``; attribution lines (``-- Author, "Episode"``) are removed so that a model has
to read the quotation itself (the Star Trek ones would otherwise give the answer away), and only short entries are
kept so that sequences, and the run, stay short.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    """(text, label name) pairs from a ``.jsonl`` file (one object per line), a ``.json`` file (an array of objects,
    or one object per line), a ``.csv`` file (a header row naming the fields), or a folder written by
    ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` uses its ``train`` split). Files are read as UTF-8; a
    leading byte-order mark (as spreadsheet programs write) is dropped.

    Labels are strings, numbers or booleans, one of these types per file; equal numbers are one class (``1`` and
    ``1.0`` are both named ``'1'``). A record without a label (missing, null, empty) is refused, naming where it is:
    a silent class named ``'None'`` or ``''`` would be trained on."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"--data {str(path)!r} does not exist")
    if path.is_dir():
        rows = [(f"record {number}", row) for number, row in enumerate(_rows_from_disk(path), 1)]
    elif path.suffix in (".jsonl", ".json"):
        rows = json_rows(path, read_text(path))
    elif path.suffix == ".csv":
        rows = _csv_rows(path, read_text(path))
    else:
        raise DataError(f"--data {str(path)!r}: expected a .jsonl, .json or .csv file or a save_to_disk folder")
    records = []
    first_of_kind: dict[str, tuple[str, Any]] = {}  # label kind -> (where, label) of its first record
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"--data {str(path)!r}: {where} is a {type(row).__name__}, not an object")
        missing = [name for name in (text_field, label_field) if name not in row]
        if missing:
            fields = sorted(name for name in row if isinstance(name, str))  # csv keys surplus cells under None
            raise DataError(f"--data {str(path)!r}: {where} has no field {missing[0]!r} (its fields: {fields})")
        text, label = row[text_field], row[label_field]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"--data {str(path)!r}: {where} field {text_field!r} is not a non-empty string")
        name, kind = _label_name(label)
        if name is None:
            raise DataError(
                f"--data {str(path)!r}: {where} field {label_field!r} is {kind}; every record needs a "
                "label (a string or a number)"
            )
        first_of_kind.setdefault(kind, (where, label))
        if len(first_of_kind) > 1:
            # "1" and 1 (or "0" and 0.0) would be two classes, or one, depending on a convention the user never
            # chose; a file mixing label types is almost always a mistake, so refuse it rather than guess.
            (where_a, label_a), (where_b, label_b) = first_of_kind.values()
            raise DataError(
                f"--data {str(path)!r}: labels mix {type(label_a).__name__} and "
                f"{type(label_b).__name__} ({where_a}: {label_a!r}, {where_b}: {label_b!r}); give every "
                "label the same type"
            )
        records.append((text, name))
    if not records:
        raise DataError(f"--data {str(path)!r} holds no records")
    return records


def _label_name(label: Any) -> tuple[str | None, str]:
    """The class name of a label and its kind ('str', 'number', 'bool'); for a label that cannot name a class,
    (None, why not)."""
    if label is None:
        return None, "null or missing"
    if isinstance(label, bool):  # before int: True == 1, but a boolean label is not the class 1
        return str(label), "bool"
    if isinstance(label, int):
        return str(label), "number"
    if isinstance(label, float):
        if not math.isfinite(label):
            return None, repr(label)
        # Equal numbers are one class: 1.0 is named like 1, so JSON writers that emit floats do not split classes.
        return str(int(label)) if label.is_integer() else repr(label), "number"
    if isinstance(label, str):
        return (label, "str") if label.strip() else (None, "empty")
    return None, f"a {type(label).__name__}"


def read_text(path: Path, option: str = "--data") -> str:
    """The file's text, decoded as UTF-8 without a leading byte-order mark (what ``encoding='utf-8-sig'`` does),
    decoded here from the bytes so that an error can name the line and the byte. Errors name ``option``, the
    command-line option that gave the path."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{option} {str(path)!r} cannot be read ({err.strerror or err})") from None
    body = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as err:
        line = body.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{option} {str(path)!r} is not UTF-8 text: line {line} has byte 0x{body[err.start]:02x} "
            f"({err.reason}); save the file as UTF-8"
        ) from None


def json_rows(path: Path, text: str, option: str = "--data") -> list[tuple[str, Any]]:
    """(where, value) of each record of JSON text: a ``.json`` file may hold one array of records (or one object);
    otherwise, and always for ``.jsonl``, each non-blank line is one record (JSON lines). Errors name the line or
    record, and ``option``."""
    if path.suffix == ".json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as err:
            # Meant as one array: its own error, not one about line 1 alone. Otherwise several values: JSON lines.
            if text.lstrip().startswith("["):
                raise DataError(
                    f"{option} {str(path)!r} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
                ) from None
        else:
            if isinstance(document, list):
                return [(f"record {number}", row) for number, row in enumerate(document, 1)]
            if isinstance(document, dict):  # one object (a one-line JSON-lines file): one record, as before
                return [("record 1", document)]
            raise DataError(
                f"{option} {str(path)!r}: the JSON value is a {type(document).__name__}; expected an "
                "array of records (objects) or one record per line (JSON lines)"
            )
    rows = []
    for number, line in enumerate(io.StringIO(text, newline=None), 1):  # universal newlines, as a text file
        if line.strip():
            try:
                rows.append((f"line {number}", json.loads(line.rstrip("\n"))))  # its end is not in a string
            except json.JSONDecodeError as err:
                hint = (
                    ": a tab or line break inside a string must be written as \\t or \\n"
                    if "control character" in err.msg
                    else ""
                )
                raise DataError(
                    f"{option} {str(path)!r}: line {number} is not JSON ({err.msg} column {err.colno}{hint})"
                    if err.msg.endswith(" at")
                    else f"{option} {str(path)!r}: line {number} is not JSON ({err.msg} at column {err.colno}{hint})"
                ) from None
    return rows


def _csv_rows(path: Path, text: str) -> list[tuple[str, Any]]:
    """(where, row) of each row of CSV text with a header; ``where`` is the line the row ends on."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        return [(f"line {reader.line_num}", row) for row in reader]
    except csv.Error as err:
        raise DataError(f"--data {str(path)!r}: line {reader.line_num} is not CSV ({err})") from None


def _rows_from_disk(path: Path) -> list[dict]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dev/trl dependency
        raise DataError(f"--data {str(path)!r} is a folder: reading it needs `pip install datasets`") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 -- datasets raises FileNotFoundError or its own errors for a foreign folder
        raise DataError(f"--data {str(path)!r} is not a datasets.save_to_disk folder ({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"--data {str(path)!r}: a DatasetDict without a 'train' split ({list(loaded)})")
        loaded = loaded["train"]
    return list(loaded)


def split(
    records: list[tuple[str, str]], max_examples: int, seed: int, held_out_fraction: float = 0.25, source: str = ""
) -> LabelledText:
    """A class-balanced, stratified train / held-out split of at most ``max_examples`` records, fixed by ``seed``.

    Each label keeps at most ``max_examples // num_labels`` records, a ``held_out_fraction`` of them (at least one)
    held out. Label ids follow the sorted label names (numerically for numeric labels); the built-in categories
    keep their order."""
    by_label: dict[str, list[str]] = defaultdict(list)
    for text, label in records:
        by_label[label].append(text)
    if set(by_label) == set(CATEGORIES):
        names = list(CATEGORIES)
    elif all(_number(name) is not None for name in by_label):  # numeric labels keep their numeric order
        names = sorted(by_label, key=lambda name: (_number(name), name))
    else:
        names = sorted(by_label)
    if len(names) < 2:
        raise DataError(f"the data need at least two distinct labels, found {names}")
    small = [name for name in names if len(by_label[name]) < 2]
    if small:
        raise DataError(
            f"label {small[0]!r} has {len(by_label[small[0]])} record(s); every label needs at least 2 "
            "(one to train on, one held out)"
        )
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


def _number(name: str) -> float | None:
    """The finite number a label name spells, or None."""
    try:
        value = float(name)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def load(data: str | None, max_examples: int, seed: int) -> LabelledText:
    """The built-in quotations (``data=None``) or the user's file, split for training."""
    if data is None:
        return split(
            fortunes_records(),
            max_examples,
            seed,
            source=f"Debian fortunes quotations ({FORTUNES_DIR}/{{{','.join(CATEGORIES)}}})",
        )
    return split(read_records(data), max_examples, seed, source=str(data))
