"""The built-in instruction data of ``peft-sparse sft``: WordNet definitions and dictionary forms.

A hand-written miniature of WordNet's file formats checks the parsing (byte offsets, glosses without their usage
examples, the irregular-form lists); the installed ``wordnet-base`` (which CI installs) checks the real splits.
"""

from __future__ import annotations

import pytest

from peft_sparse.cli import instructions

HEADER = "  1 This software and database is being provided to you\n"


def write_wordnet(directory):
    """Two nouns and a verb in WordNet's index/data format (data lines found by byte offset) plus .exc lists."""
    data_noun = HEADER
    offsets = {}
    for word, gloss in (
        ("harbor", 'a sheltered port; "the ship entered the harbor"'),
        ("rare", "a word with no tagged sense"),
    ):
        offsets[word] = len(data_noun.encode())
        data_noun += f"{offsets[word]:08d} 06 n 01 {word} 0 000 | {gloss}  \n"
    index_noun = HEADER + (
        f"harbor n 1 1 @ 1 3 {offsets['harbor']:08d}  \n"  # tagsense_cnt 3: common
        f"rare n 1 1 @ 1 0 {offsets['rare']:08d}  \n"
    )  # never tagged: left out
    verb_offset = len(HEADER.encode())
    data_verb = HEADER + f'{verb_offset:08d} 29 v 01 eat 0 000 | take in solid food; "she eats well"  \n'
    index_verb = HEADER + f"eat v 1 1 @ 1 5 {verb_offset:08d}  \n"
    for pos in ("adj", "adv"):
        (directory / f"index.{pos}").write_text(HEADER)
        (directory / f"data.{pos}").write_text(HEADER)
    (directory / "index.noun").write_text(index_noun)
    (directory / "data.noun").write_text(data_noun)
    (directory / "index.verb").write_text(index_verb)
    (directory / "data.verb").write_text(data_verb)
    (directory / "noun.exc").write_text("mice mouse\ncorpora corpus\nsheep sheep\n")
    (directory / "verb.exc").write_text("ate eat\nfed_up feed_up\n")
    (directory / "adj.exc").write_text("better good\n")


def test_parses_glosses_by_offset_and_keeps_only_tagged_words(tmp_path):
    write_wordnet(tmp_path)
    assert sorted(instructions.definitions(tmp_path)) == [
        ("eat", "verb", "take in solid food"),
        ("harbor", "noun", "a sheltered port"),
    ]
    # identical forms and multi-word entries are not questions with an answer to learn
    assert instructions.base_forms(tmp_path) == [
        ("mice", "mouse"),
        ("corpora", "corpus"),
        ("ate", "eat"),
        ("better", "good"),
    ]
    by_task = instructions.examples(tmp_path)
    define = dict(by_task["define"])["harbor"]
    assert define["prompt"] == [{"role": "user", "content": "What does the noun 'harbor' mean?"}]
    assert define["completion"] == [{"role": "assistant", "content": "A sheltered port."}]
    assert dict(by_task["base_form"])["mouse"]["answer"] == "mouse"


def test_missing_wordnet_says_how_to_install_it(tmp_path):
    with pytest.raises(instructions.InstructionDataError, match="apt-get install -y wordnet-base"):
        instructions.load(directory=tmp_path)


def test_the_installed_wordnet_gives_seeded_splits_with_disjoint_words():
    data = instructions.load(seed=3)
    assert {name: len(split) for name, split in data.items()} == {"train": 2000, "validation": 200, "test": 200}
    assert instructions.load(seed=3)["test"]["answer"] == data["test"]["answer"]
    assert instructions.load(seed=4)["test"]["answer"] != data["test"]["answer"]

    def words(split):  # what each example is about, per task: the defined word, or the dictionary form
        return {
            (row["task"], row["prompt"][0]["content"].split("'")[1] if row["task"] == "define" else row["answer"])
            for row in data[split]
        }

    assert not words("train") & words("test") and not words("validation") & words("test")
    for split in data.values():
        assert split["task"].count("base_form") == split["task"].count("define")
