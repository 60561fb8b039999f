"""Every Python block in README.md and docs/ runs, as written and in order, so that the documentation cannot rot;
every relative link in them points at a file (and heading) that exists; the configuration reference agrees with
``SparseConfig``.

The quickstart is complete (it fine-tunes the shipped SmolLM2, saves, reloads and merges, asserting the outputs
agree); the later blocks, the README's then those of ``DOCS`` in order, continue from it, as the documents say. They
run in one fresh interpreter, offline, in a temporary folder (the blocks write ``out/``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The documents whose Python blocks continue the README's, in the order they run.
DOCS = [ROOT / "docs" / name for name in ("distributed.md", "configuration.md", "guide.md")]
ALL_DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
# A fenced Python block, possibly indented inside a list item: the indentation, then everything up to the fence.
BLOCK = re.compile(r"^(?P<indent>[ \t]*)```python\n(?P<body>.*?)^(?P=indent)```$", re.DOTALL | re.MULTILINE)


def python_blocks(documents=None) -> list[str]:
    return [
        textwrap.dedent(match["body"])
        for document in documents or [README, *DOCS]
        for match in BLOCK.finditer(document.read_text())
    ]


def test_the_readme_has_a_complete_quickstart_first():
    blocks = python_blocks()
    assert len(blocks) >= 8
    # every document with Python blocks is run
    assert {d for d in ALL_DOCUMENTS if python_blocks([d])} <= {README, *DOCS}
    for block in blocks:
        compile(block, "README.md", "exec")  # each block is valid Python on its own
    quickstart = blocks[0]
    for step in (
        "shipped_model_path(",
        "select_mask(",
        "save_pretrained(",
        "PeftModel.from_pretrained(",
        "merge_and_",
    ):
        assert step in quickstart


@pytest.mark.slow
def test_every_python_block_in_the_readme_runs(tmp_path):
    script = "\n\n".join(f"# --- README block {i}\n{block}" for i, block in enumerate(python_blocks()))
    (tmp_path / "readme_blocks.py").write_text(script)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "readme_blocks.py"],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "epoch 2: loss" in result.stdout
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()  # the SFTTrainer block's adapter


LINK = re.compile(r"\]\((?!https?://|mailto:)(?P<target>[^)#\s]*)(?:#(?P<anchor>[^)\s]*))?\)")


def _anchors(document: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but hyphens and underscores dropped, spaces to hyphens."""
    anchors = set()
    for line in document.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("document", ALL_DOCUMENTS, ids=lambda d: d.name)
def test_every_relative_link_resolves(document):
    for match in LINK.finditer(document.read_text()):
        target = (document.parent / match["target"]).resolve() if match["target"] else document
        assert target.exists(), f"{document.name}: {match[0]}"
        if match["anchor"] and target.suffix == ".md":
            assert match["anchor"] in _anchors(target), f"{document.name}: {match[0]}"


def test_the_readme_is_short_and_names_no_issue():
    assert len(README.read_text().splitlines()) <= 200
    for document in ALL_DOCUMENTS:
        assert not re.search(r"\bissues? #?\d+", document.read_text(), re.IGNORECASE), document.name


def test_the_configuration_reference_lists_every_field_with_its_default():
    import dataclasses

    from peft_sparse import SparseConfig

    table = (ROOT / "docs" / "configuration.md").read_text()
    rows = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 3:
            for name in re.findall(r"`(\w+)`", cells[0]):
                rows[name] = cells[1]
    ours = [f for f in dataclasses.fields(SparseConfig) if f.name in SparseConfig.__annotations__]
    assert ours
    for field in ours:
        assert field.name in rows, f"docs/configuration.md does not list SparseConfig.{field.name}"
        if field.default is not dataclasses.MISSING and rows[field.name]:
            assert rows[field.name] == f"`{field.default!r}`".replace("'", '"'), field.name
