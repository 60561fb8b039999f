"""Choosing the trainable entries: salience metrics (SPEFT) and exact top-k over many layers."""

from .salience import METRICS, GradientProbe, Metric
from .select import SelectionReport, select_mask
from .topk import select_top_k

__all__ = ["METRICS", "GradientProbe", "Metric", "SelectionReport", "select_mask", "select_top_k"]
