"""The examples run end to end (offline, CPU): they are the README's promises."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
def test_sft_trl_example_trains_saves_and_reloads(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "sft_trl.py"), "--steps", "20", "--output-dir", str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "reloaded indices and values identical: True" in result.stdout
    assert "step 0: selected_entries=" in result.stdout and "step 20" not in result.stdout.split("sparse events")[1]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
