"""Where this process stands in ``torch.distributed`` (a single process when it is not initialised)."""

from __future__ import annotations

import torch


def _initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if _initialised() else 1


def rank() -> int:
    return torch.distributed.get_rank() if _initialised() else 0
