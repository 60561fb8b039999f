"""``peft-sparse sft``'s data: the built-in WordNet instructions, a ``datasets.save_to_disk`` folder or a
``.jsonl``/``.json`` file, split into training and held-out rows; TRL formats and tokenises them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import data as data_module
from .. import instructions
from .arguments import SftError, _one_line

DATA_SUFFIXES = (".jsonl", ".json")


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


def run_data(script_args, training_args, sparse_args) -> HeldOutData:
    """:func:`load_data` with the run's seed, held-out share and size and text field, as every process of a run
    (the parent, each worker, the timing) reads the data."""
    return load_data(
        script_args,
        training_args.seed,
        sparse_args.eval_fraction,
        sparse_args.max_eval_examples,
        training_args.dataset_text_field,
    )


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
