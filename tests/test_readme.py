"""Every Python block in README.md runs, as written and in order, so that the README cannot rot.

The quickstart is complete (it fine-tunes the shipped SmolLM2, saves, reloads and merges, asserting the outputs
agree); the later blocks continue from it, as the README says. They run in one fresh interpreter, offline, in a
temporary folder (the blocks write ``out/``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
# A fenced Python block, possibly indented inside a list item: the indentation, then everything up to the fence.
BLOCK = re.compile(r"^(?P<indent>[ \t]*)```python\n(?P<body>.*?)^(?P=indent)```$", re.DOTALL | re.MULTILINE)


def python_blocks() -> list[str]:
    return [textwrap.dedent(match["body"]) for match in BLOCK.finditer(README.read_text())]


def test_the_readme_has_a_complete_quickstart_first():
    blocks = python_blocks()
    assert len(blocks) >= 8
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
