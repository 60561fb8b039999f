"""Choosing the trainable entries: salience metrics (SPEFT) and exact top-k over many layers."""

from .reassign import reassign_entries, surviving_positions
from .salience import METRICS, GradientProbe, Metric
from .select import SelectionReport, salience_scores, select_mask, tie_generators, update_mask
from .spiel import SpIEL, SpielReport, reselection_fraction
from .topk import select_top_k

__all__ = [
    "METRICS",
    "GradientProbe",
    "Metric",
    "SelectionReport",
    "SpIEL",
    "SpielReport",
    "reassign_entries",
    "reselection_fraction",
    "salience_scores",
    "select_mask",
    "select_top_k",
    "surviving_positions",
    "tie_generators",
    "update_mask",
]
