"""Resume is exact at every step position: a run that saves a checkpoint after every optimizer step, resumed from
each of them in a fresh process (tests/resume_run.py), ends with the same indices, values, residual entries and
optimizer state as the run itself; for a static mask, dynamic updates, SpIEL-AG and SpIEL-MA (and the first two
with a low-rank term beside the entries, whose factors must resume too), with and without
gradient accumulation, with the Trainer's shuffling sampler across epoch boundaries."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "resume_run.py"
STEPS = 7  # resume_run.MAX_STEPS


def _run(*args: str) -> None:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args], check=False, capture_output=True, text=True, env=environment
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _assert_same(got: dict, expected: dict, where: str) -> None:
    for key in ("indices", "residual"):
        for name, tensor in expected[key].items():
            assert torch.equal(got[key][name], tensor), f"{where}: {key} of {name}"
    for key in ("values", "low_rank"):
        assert got[key].keys() == expected[key].keys(), where
        for name, tensor in expected[key].items():
            torch.testing.assert_close(got[key][name], tensor, rtol=0, atol=1e-6, msg=f"{where}: {key} of {name}")
    expected_state, got_state = expected["optimizer"]["state"], got["optimizer"]["state"]
    assert got_state.keys() == expected_state.keys(), where
    for position, entries in expected_state.items():
        assert got_state[position].keys() == entries.keys(), where
        for key, value in entries.items():
            torch.testing.assert_close(
                torch.as_tensor(got_state[position][key]),
                torch.as_tensor(value),
                rtol=0,
                atol=1e-6,
                msg=f"{where}: optimizer state {key} of parameter {position}",
            )
    assert [entry["step"] for entry in got["log"]] == [entry["step"] for entry in expected["log"]], where


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("mode", ["static", "dynamic", "spiel_ag", "spiel_ma", "hybrid_dynamic", "hybrid_spiel_ag"])
def test_resume_from_every_step_equals_the_uninterrupted_run(tmp_path, mode, accumulation):
    _run(mode, str(accumulation), str(tmp_path / "run"), str(tmp_path / "run.pt"), "--save-every-step")
    expected = torch.load(tmp_path / "run.pt", weights_only=False)
    steps = range(1, STEPS)
    checkpoints = [tmp_path / "run" / f"checkpoint-{step}" for step in steps]
    assert all(checkpoint.is_dir() for checkpoint in checkpoints)
    with ThreadPoolExecutor(max_workers=max(1, min(len(checkpoints), os.cpu_count() or 1))) as pool:
        list(
            pool.map(
                lambda step: _run(
                    mode,
                    str(accumulation),
                    str(tmp_path / f"resumed-{step}"),  # a new output_dir: the checkpoint is not under it
                    str(tmp_path / f"resumed-{step}.pt"),
                    "--resume",
                    str(tmp_path / "run" / f"checkpoint-{step}"),
                ),
                steps,
            )
        )
    for step in steps:
        got = torch.load(tmp_path / f"resumed-{step}.pt", weights_only=False)
        _assert_same(got, expected, f"{mode}, accumulation {accumulation}, resumed at step {step}")
