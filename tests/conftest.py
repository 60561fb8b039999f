"""Shared fixtures. Tests run offline: tiny models are built from configs, never downloaded."""

from __future__ import annotations

import os
import subprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from tiny_models import MODEL_FAMILIES

import peft_sparse  # noqa: F401  (registers PeftType.SPARSE)


@pytest.fixture(params=sorted(MODEL_FAMILIES))
def family(request):
    """Each tiny model family in turn: llama, gpt2 (Conv1D), bert (sequence classification), opt."""
    return request.param


@pytest.fixture
def cli_here(capfd):
    """``cli_here(*argv)`` runs ``peft-sparse ARGV`` in the test's own process (a command's per-method workers are
    still processes of their own) and returns what ``subprocess.run`` would: the exit code and both streams, caught
    at the file descriptors so that the workers' output is in them too."""
    from _peft_sparse_cli import main  # the console script's entry point: quiet, as users run it

    def run(*argv) -> subprocess.CompletedProcess:
        capfd.readouterr()
        code = main([str(arg) for arg in argv])
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(["peft-sparse", *map(str, argv)], code, out, err)

    return run
