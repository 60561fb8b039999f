"""Shared fixtures. Tests run offline: tiny models are built from configs, never downloaded."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from tiny_models import MODEL_FAMILIES

import peft_sparse  # noqa: F401  (registers PeftType.SPARSE)


@pytest.fixture(params=sorted(MODEL_FAMILIES))
def family(request):
    """Each tiny model family in turn: llama, gpt2 (Conv1D), bert (sequence classification), opt."""
    return request.param
