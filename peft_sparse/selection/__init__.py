"""Choosing the trainable entries: salience metrics (SPEFT) and exact top-k over many layers."""

from .optim import reassign_entries, surviving_positions
from .salience import METRICS, GradientProbe, Metric
from .select import SelectionReport, select_mask, update_mask
from .topk import select_top_k

__all__ = [
    "METRICS",
    "GradientProbe",
    "Metric",
    "SelectionReport",
    "reassign_entries",
    "select_mask",
    "select_top_k",
    "surviving_positions",
    "update_mask",
]
