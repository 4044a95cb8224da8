"""Matplotlib figures of an imatrix (Agg only: built as `Figure` objects, never through pyplot)."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from imatrix.matrix import ImportanceMatrix
from imatrix.stats.compute import Statistics, active_values
from imatrix.stats.names import layer_number, split_name

N_SKEWED = 6


def mean_importance_grid(matrix: ImportanceMatrix) -> tuple[list[int], list[str], np.ndarray]:
    """(layers, kinds, grid[kind, layer]) of the mean Σx²/count over columns; NaN where absent."""
    entries = [(layer_number(split_name(n)[0]), split_name(n)[1], n) for n in matrix.tensors]
    layers = sorted({layer for layer, _, _ in entries if layer >= 0})
    kinds = sorted({kind for layer, kind, _ in entries if layer >= 0})
    grid = np.full((len(kinds), len(layers)), np.nan)
    for layer, kind, name in entries:
        acts = active_values(matrix.tensors[name])
        if layer >= 0 and acts.size:
            grid[kinds.index(kind), layers.index(layer)] = float(acts.astype(np.float64).mean())
    return layers, kinds, grid


def heatmap_figure(matrix: ImportanceMatrix) -> Figure:
    layers, kinds, grid = mean_importance_grid(matrix)
    fig = Figure(figsize=(max(8.0, 0.3 * len(layers) + 3), 0.45 * len(kinds) + 2), layout="constrained")
    ax = fig.add_subplot()
    positive = grid[np.isfinite(grid) & (grid > 0)]
    norm = LogNorm(positive.min(), positive.max()) if positive.size else None
    image = ax.imshow(
        np.where(grid > 0, grid, np.nan), aspect="auto", cmap="viridis", norm=norm, interpolation="nearest"
    )
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=8)
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_xlabel("layer")
    ax.set_title("Mean importance Σx²/count per layer and tensor kind (log scale)")
    fig.colorbar(image, ax=ax, label="mean Σx²/count")
    return fig


def layer_curves_figure(stats: Statistics) -> Figure:
    """ZD, CosSim and L₂ against the previous layer, per layer (from preferred-mode statistics)."""
    layers = [row.layer for row in stats.layers]
    series = (
        ("ZD (% of |Z| > 1)", [100 * row.zd for row in stats.layers], "tab:orange"),
        ("CosSim to previous layer", [row.cossim for row in stats.layers], "tab:blue"),
        ("L₂ distance to previous layer (log scale)", [row.l2 or np.nan for row in stats.layers], "tab:green"),
    )
    fig = Figure(figsize=(9, 7), layout="constrained")
    axes = fig.subplots(len(series), 1, sharex=True)
    for ax, (label, values, color) in zip(axes, series, strict=True):
        ax.plot(layers, values, marker="o", markersize=3, color=color, label=label)
        ax.set_ylabel(label.split(" ")[0])
        ax.set_title(label, fontsize=10, loc="left")
        ax.grid(alpha=0.3)
    if np.isfinite(series[-1][1]).any():
        axes[-1].set_yscale("log")  # outlier layers are orders of magnitude away from the rest
    axes[-1].set_xlabel("layer")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("Per-layer statistics")
    return fig


def most_skewed(stats: Statistics, count: int = N_SKEWED) -> list[str]:
    """Tensors whose importance is least evenly spread (lowest normalised entropy)."""
    return [row.name for row in sorted(stats.tensors, key=lambda row: row.entropy_norm)[:count]]


def skew_figure(matrix: ImportanceMatrix, stats: Statistics, count: int = N_SKEWED) -> Figure:
    names = most_skewed(stats, count)
    cols = min(3, max(1, len(names)))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(4 * cols, 3 * rows + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, name in zip(axes, names, strict=False):
        acts = active_values(matrix.tensors[name]).astype(np.float64)
        # log10 values on linear axes: log-scaled axes cost seconds of tick layout per figure
        ax.hist(np.log10(acts[acts > 0]), bins=40, color="tab:purple")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("log₁₀ Σx²/count per column")
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    axes[0].set_ylabel("columns")
    fig.suptitle("Per-column importance of the most skewed tensors (lowest entropy)")
    return fig


def expert_counts(matrix: ImportanceMatrix) -> tuple[list[int], np.ndarray] | None:
    """(layers, counts[expert, layer]) from each layer's first expert tensor; None for dense files."""
    per_layer: dict[int, np.ndarray] = {}
    for name in sorted(matrix.tensors):
        layer = layer_number(split_name(name)[0])
        stats = matrix.tensors[name]
        if stats.n_mat > 1 and layer >= 0 and layer not in per_layer:
            per_layer[layer] = stats.counts
    if not per_layer:
        return None
    layers = sorted(per_layer)
    n_experts = max(counts.size for counts in per_layer.values())
    grid = np.zeros((n_experts, len(layers)), dtype=np.int64)
    for j, layer in enumerate(layers):
        grid[: per_layer[layer].size, j] = per_layer[layer]
    return layers, grid


def expert_figure(matrix: ImportanceMatrix) -> Figure | None:
    found = expert_counts(matrix)
    if found is None:
        return None
    layers, grid = found
    fig = Figure(figsize=(max(7.0, 0.5 * len(layers) + 3), 0.35 * grid.shape[0] + 2), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(np.where(grid > 0, grid, np.nan), aspect="auto", cmap="magma", interpolation="nearest")
    empty_e, empty_l = np.nonzero(grid == 0)
    ax.scatter(empty_l, empty_e, marker="x", color="red", s=60, label="no data")
    if empty_e.size:
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_yticks(range(grid.shape[0]), [str(e) for e in range(grid.shape[0])], fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel("expert")
    if grid.size <= 400:
        _annotate_counts(ax, grid)
    ax.set_title(f"Token rows per expert ({int((grid == 0).sum())} expert×layer cells with no data)", fontsize=10)
    fig.colorbar(image, ax=ax, label="token rows")
    return fig


def _annotate_counts(ax, grid: np.ndarray) -> None:
    threshold = grid.max() / 2
    for (expert, layer), count in np.ndenumerate(grid):
        color = "black" if count > threshold else "white"
        if count > 0:
            ax.text(layer, expert, str(count), ha="center", va="center", fontsize=7, color=color)
