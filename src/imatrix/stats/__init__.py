"""Inspecting imatrices: statistics (`--show-statistics`), comparisons and HTML/PNG reports."""

from imatrix.stats.compare import Comparison, Similarity, compare_matrices, render_comparison
from imatrix.stats.compute import (
    MODES,
    LayerRow,
    Statistics,
    TensorRow,
    active_values,
    compute_statistics,
    ecs,
)
from imatrix.stats.render import render, render_csv, render_table

__all__ = [
    "MODES",
    "Comparison",
    "Similarity",
    "compare_matrices",
    "render_comparison",
    "LayerRow",
    "Statistics",
    "TensorRow",
    "active_values",
    "compute_statistics",
    "ecs",
    "render",
    "render_csv",
    "render_table",
]
