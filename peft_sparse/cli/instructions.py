"""The built-in instruction data set of ``peft-sparse sft``: real prompt -> completion pairs from WordNet.

WordNet 3.0 ships in Debian's ``wordnet-base`` package (``apt-get install -y wordnet-base``; Princeton's WordNet 3.0
licence, ``/usr/share/doc/wordnet-base/copyright``). Two kinds of instruction are built from it, one chat turn each
(TRL's conversational prompt-completion format, so the loss is on the completion only):

* ``define``: "What does the noun 'harbor' mean?" -> the dictionary definition of the word's most frequent sense
  (WordNet's gloss, without its usage examples). Words are the single-word lemmas that occur in WordNet's
  sense-tagged corpus (``tagsense_cnt >= 1``), so they are common words.
* ``base_form``: "What is the dictionary form of the word 'mice'?" -> "mouse", from WordNet's irregular-form lists
  (``noun.exc``, ``verb.exc``, ``adj.exc``). The answer is one word, so generation can be scored by exact match.

Each example also keeps ``task`` and ``answer`` (the completion's text). The split into train / validation / test is
seeded and stratified by task; a word never appears in two splits.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")  # apt-get install wordnet-base
POS_NAMES = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
NAME = "wordnet"  # what ``--dataset_name`` calls the built-in data set
_WORD = re.compile(r"^[a-z]+$")


class InstructionDataError(ValueError):
    """The built-in data cannot be read; the message says how to install it."""


def _require(path: Path) -> Path:
    if not path.is_file():
        raise InstructionDataError(f"{path} not found: install WordNet with `apt-get install -y wordnet-base`")
    return path


def _gloss(line: str) -> str:
    """The definition part of a ``data.*`` line: after ``|``, before the first quoted usage example."""
    gloss = line.split(" | ", 1)[1].strip()
    gloss = re.split(r';\s*"', gloss, maxsplit=1)[0]
    return gloss.strip().rstrip(";").strip()


def definitions(directory: Path = WORDNET_DIR) -> list[tuple[str, str, str]]:
    """(word, part of speech, definition of its most frequent sense) for common single-word lemmas."""
    out = []
    for pos, pos_name in POS_NAMES.items():
        offsets = {}
        for line in _require(directory / f"index.{pos}").read_text(encoding="utf-8").splitlines():
            if line.startswith(" "):  # the licence header
                continue
            fields = line.split()
            lemma, p_cnt = fields[0], int(fields[3])
            rest = fields[4 + p_cnt :]  # sense_cnt, tagsense_cnt, synset offsets
            if _WORD.match(lemma) and len(lemma) > 2 and int(rest[1]) >= 1:
                offsets[lemma] = int(rest[2])
        with open(_require(directory / f"data.{pos}"), "rb") as data:
            for lemma, offset in offsets.items():
                data.seek(offset)  # synset offsets are byte offsets into data.<pos>
                gloss = _gloss(data.readline().decode("utf-8"))
                if 10 <= len(gloss) <= 160:
                    out.append((lemma, pos_name, gloss))
    return out


def base_forms(directory: Path = WORDNET_DIR) -> list[tuple[str, str]]:
    """(inflected form, dictionary form) from WordNet's irregular-form lists, one-word forms that differ."""
    out, seen = [], set()
    for pos in ("noun", "verb", "adj"):
        for line in _require(directory / f"{pos}.exc").read_text(encoding="utf-8").splitlines():
            fields = line.split()
            if len(fields) < 2:
                continue
            form, base = fields[0], fields[1]
            if form != base and _WORD.match(form) and _WORD.match(base) and form not in seen:
                seen.add(form)
                out.append((form, base))
    return out


def _example(task: str, prompt: str, answer: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "completion": [{"role": "assistant", "content": answer}],
        "task": task,
        "answer": answer,
    }


def examples(directory: Path = WORDNET_DIR) -> dict[str, list[dict]]:
    """Every example of each task, keyed by the word it is about (the unit that never crosses splits)."""
    by_task: dict[str, list[tuple[str, dict]]] = {"define": [], "base_form": []}
    for word, pos, gloss in definitions(directory):
        answer = gloss[0].upper() + gloss[1:] + "."
        by_task["define"].append((word, _example("define", f"What does the {pos} '{word}' mean?", answer)))
    for form, base in base_forms(directory):
        by_task["base_form"].append(
            (base, _example("base_form", f"What is the dictionary form of the word '{form}'?", base))
        )
    return by_task


def load(seed: int = 0, sizes: dict[str, tuple[int, int, int]] | None = None, directory: Path = WORDNET_DIR):
    """A ``datasets.DatasetDict`` with ``train``, ``validation`` and ``test`` splits.

    ``sizes`` maps each task to (train, validation, test) counts (default: 1,000 / 100 / 100 per task). Examples are
    shuffled with ``seed``; all examples about one word go to the same split, so held-out words are unseen."""
    from datasets import Dataset, DatasetDict

    sizes = sizes or {"define": (1000, 100, 100), "base_form": (1000, 100, 100)}
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for task, items in examples(directory).items():
        if task not in sizes:
            continue
        words = sorted({word for word, _ in items})
        rng.shuffle(words)
        n_train, n_val, n_test = sizes[task]
        held = {}
        for word in words:  # held-out words first, so that train never takes them
            if len(held) >= n_val + n_test:
                break
            held[word] = "validation" if len(held) < n_val else "test"
        grouped: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
        shuffled = list(items)
        rng.shuffle(shuffled)
        for word, example in shuffled:
            grouped[held.get(word, "train")].append(example)
        for name, limit in (("train", n_train), ("validation", n_val), ("test", n_test)):
            splits[name].extend(grouped[name][:limit])
    for rows in splits.values():
        rng.shuffle(rows)
    return DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()})
