"""Per-tensor and per-layer importance statistics (`--show-statistics`).

Two modes:
- "legacy": llama-imatrix's table, reproduced to the printed digit. llama.cpp accumulates in
  float32 from left to right, so sums here are float32 cumulative sums rather than numpy's
  pairwise sums, and Σ(Act²)/μ/σ/entropy/ZD use Σx²/count of every matrix with data.
  CosSim compares the raw sums with the previous block's, as llama.cpp does.
- "preferred": the newer definitions (L₂ Norm and ECS against the previous layer, H Norm,
  |Z| > 1), computed in float64 on the mean activations Σx²/count.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from imatrix.errors import ImatrixError
from imatrix.matrix import ImportanceMatrix, TensorStats
from imatrix.stats.names import layer_number, previous_block_name, split_name

MODES = ("legacy", "preferred")
ECS_K = 100.0  # ECS is reported as a percentage: identical consecutive layers score 100
ECS_ALPHA = 0.01
ECS_GAMMA = 10.0
_INACTIVE = np.float32(1e-5)


@dataclass
class TensorRow:
    name: str
    layer: str
    kind: str
    sum_sq: float  # Σ(Act²): sum of Σx²/count over all columns (and experts with data)
    min: float
    max: float
    mean: float
    std: float
    active: float  # fraction of values above 1e-5
    n: int
    entropy: float  # bits
    entropy_norm: float  # percent of log2(N)
    zd: float  # fraction of values with Z > 1 (legacy) or |Z| > 1 (preferred)
    cossim: float
    l2: float = 0.0  # preferred only: distance to the previous block's mean activations
    ecs: float = 0.0  # preferred only


@dataclass
class LayerRow:
    layer: int
    sum_sq: float  # element-weighted mean of the tensors' Σ(Act²)
    zd: float
    cossim: float
    l2: float = 0.0
    ecs: float = 0.0
    n: int = 0


@dataclass
class Statistics:
    source: str
    mode: str
    tensors: list[TensorRow] = field(default_factory=list)
    layers: list[LayerRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "mode": self.mode,
            "tensors": [finite_or_null(asdict(row)) for row in self.tensors],
            "layers": [finite_or_null(asdict(row)) for row in self.layers],
        }


def finite_or_null(values: dict) -> dict:
    """NaN/inf (e.g. CosSim against an all-zero tensor) become null so the JSON stays valid."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}


def compute_statistics(matrix: ImportanceMatrix, mode: str = "legacy", source: str = "") -> Statistics:
    """Statistics of every tensor with data, sorted as llama-imatrix sorts them."""
    source = source or "imatrix"
    if mode not in MODES:
        raise ImatrixError(f"{source}: unknown statistics mode '{mode}' (expected legacy or preferred)")
    if not matrix.tensors:
        raise ImatrixError(f"{source}: the imatrix has no tensors")
    rows = [_tensor_row(name, stats, mode) for name, stats in matrix.tensors.items() if (stats.counts > 0).any()]
    if not rows:
        raise ImatrixError(f"{source}: every tensor has a zero token count, no statistics to compute")
    by_name = {row.name: row for row in rows}
    for row in rows:
        _fill_previous(row, by_name, matrix, mode)
    rows.sort(key=lambda row: (row.kind, -row.sum_sq))
    layers = _legacy_layers(rows) if mode == "legacy" else _preferred_layers(rows, matrix)
    return Statistics(source, mode, rows, layers)


def active_values(stats: TensorStats) -> np.ndarray:
    """Σx²/count of every matrix that saw tokens, flattened (float32, as llama.cpp divides)."""
    has_data = stats.counts > 0
    return (stats.sums[has_data] / stats.counts[has_data].astype(np.float32)[:, None]).ravel()


def seq_sum(values: np.ndarray) -> np.float32:
    """float32 left-to-right sum (std::accumulate with a float seed), not numpy's pairwise sum."""
    if values.size == 0:
        return np.float32(0.0)
    return np.cumsum(values, dtype=np.float32)[-1]


def _tensor_row(name: str, stats: TensorStats, mode: str) -> TensorRow:
    layer, kind = split_name(name)
    acts = active_values(stats)
    fields = _legacy_fields(acts) if mode == "legacy" else _preferred_fields(acts)
    return TensorRow(name=name, layer=layer, kind=kind, cossim=0.0, **fields)


def _legacy_fields(acts: np.ndarray) -> dict:
    n = acts.size
    size = np.float32(n)
    total = seq_sum(acts)
    mean = np.float32(total / size)
    var = np.float32(seq_sum(acts * acts) / size - mean * mean)
    std = np.float32(np.sqrt(max(np.float32(0.0), var)))
    inactive = int(np.count_nonzero(np.abs(acts) <= _INACTIVE))
    active = np.float32(1.0) - np.float32(inactive) / size
    entropy = np.float32(0.0)
    if total > 0:
        p = acts / total
        p = p[p > 0]
        entropy = seq_sum(-(p * np.log2(p)))
    above = int(np.count_nonzero((acts - mean) / std > 1)) if std > 0 else 0
    entropy_norm = 100.0 * (float(entropy) / math.log2(n)) if n > 1 else 0.0
    return {
        "sum_sq": float(total),
        "min": float(acts.min()),
        "max": float(acts.max()),
        "mean": float(mean),
        "std": float(std),
        "active": float(active),
        "n": n,
        "entropy": float(entropy),
        "entropy_norm": entropy_norm,
        "zd": float(np.float32(above) / size),
    }


def _preferred_fields(acts32: np.ndarray) -> dict:
    acts = acts32.astype(np.float64)
    n = acts.size
    total = acts.sum()
    std = acts.std()
    entropy = _entropy(acts)
    return {
        "sum_sq": float(total),
        "min": float(acts.min()),
        "max": float(acts.max()),
        "mean": float(acts.mean()),
        "std": float(std),
        "active": float(np.count_nonzero(np.abs(acts) > 1e-5) / n),
        "n": n,
        "entropy": entropy,
        "entropy_norm": 100.0 * entropy / math.log2(n) if n > 1 else 0.0,
        "zd": _zd_abs(acts),
    }


def _entropy(acts: np.ndarray) -> float:
    total = acts.sum()
    if total <= 0:
        return 0.0
    p = acts[acts > 0] / total
    return float(-(p * np.log2(p)).sum())


def _zd_abs(acts: np.ndarray) -> float:
    std = acts.std()
    if std <= 0:
        return 0.0
    return float(np.count_nonzero(np.abs(acts - acts.mean()) / std > 1.0) / acts.size)


def _fill_previous(row: TensorRow, by_name: dict[str, TensorRow], matrix: ImportanceMatrix, mode: str) -> None:
    prev_name = previous_block_name(row.name)
    if prev_name is None or prev_name not in by_name:
        return
    current, previous = matrix.tensors[row.name], matrix.tensors[prev_name]
    if current.sums.size != previous.sums.size:
        return
    if mode == "legacy":
        row.cossim = _legacy_cossim(current.sums.ravel(), previous.sums.ravel())
        return
    a, b = current.mean_sq().ravel(), previous.mean_sq().ravel()
    row.l2, row.cossim = compare_vectors(a, b)
    row.ecs = ecs(row.l2, row.cossim)


def _legacy_cossim(a: np.ndarray, b: np.ndarray) -> float:
    dot = seq_sum(a * b)
    norms = np.float32(np.sqrt(seq_sum(a * a))) * np.float32(np.sqrt(seq_sum(b * b)))
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float32(dot / norms))


def compare_vectors(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(Euclidean distance, cosine similarity) in float64; cosine 0 when either vector is zero."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    cos = float(a @ b / norms) if norms > 0 else 0.0
    return float(np.linalg.norm(a - b)), cos


def ecs(l2: float, cossim: float) -> float:
    """Euclidean-Cosine Score K·e^(-α·L₂)·|cos|^γ: high when a layer barely changes the activations."""
    return ECS_K * math.exp(-ECS_ALPHA * l2) * abs(cossim) ** ECS_GAMMA


def _legacy_layers(rows: list[TensorRow]) -> list[LayerRow]:
    """Element-weighted means per block, accumulated in float32 in table order as llama.cpp does."""
    keys = np.array([layer_number(row.layer) for row in rows])
    layers, index = np.unique(keys, return_inverse=True)
    n = np.array([row.n for row in rows])
    n32 = n.astype(np.float32)
    acc = np.zeros((3, layers.size), dtype=np.float32)
    for i, column in enumerate(("sum_sq", "zd", "cossim")):
        # np.add.at adds unbuffered in index order: the same float32 rounding as the C++ loop
        np.add.at(acc[i], index, n32 * np.array([getattr(row, column) for row in rows], dtype=np.float32))
    totals = np.zeros(layers.size, dtype=np.int64)
    np.add.at(totals, index, n)
    means = acc / totals.astype(np.float32)
    return [
        LayerRow(int(layer), float(means[0, j]), float(means[1, j]), float(means[2, j]), n=int(totals[j]))
        for j, layer in enumerate(layers)
        if layer >= 0 and totals[j] > 0
    ]


def _preferred_layers(rows: list[TensorRow], matrix: ImportanceMatrix) -> list[LayerRow]:
    groups: dict[int, list[TensorRow]] = {}
    for row in rows:
        groups.setdefault(layer_number(row.layer), []).append(row)
    result = []
    for layer in sorted(key for key in groups if key >= 0):
        members = sorted(groups[layer], key=lambda row: row.kind)
        acts = np.concatenate([active_values(matrix.tensors[row.name]) for row in members]).astype(np.float64)
        n = sum(row.n for row in members)
        sum_sq = sum(row.n * row.sum_sq for row in members) / n
        out = LayerRow(layer, sum_sq, _zd_abs(acts), 0.0, n=n)
        if layer - 1 in groups:
            current, previous = _paired_means(members, groups[layer - 1], matrix)
            if current.size:
                out.l2, out.cossim = compare_vectors(current, previous)
                out.ecs = ecs(out.l2, out.cossim)
        result.append(out)
    return result


def _paired_means(
    members: list[TensorRow], previous: list[TensorRow], matrix: ImportanceMatrix
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated mean activations of the kinds both layers have (same sizes), in kind order."""
    prev_by_kind = {row.kind: row.name for row in previous}
    pairs = [
        (matrix.tensors[row.name].mean_sq().ravel(), matrix.tensors[prev_by_kind[row.kind]].mean_sq().ravel())
        for row in members
        if row.kind in prev_by_kind
    ]
    pairs = [(a, b) for a, b in pairs if a.size == b.size]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    return np.concatenate([a for a, _ in pairs]), np.concatenate([b for _, b in pairs])
