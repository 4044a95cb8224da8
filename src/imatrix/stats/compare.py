"""Compare two imatrices: cosine similarity and symmetric KL divergence of normalised importance.

A tensor's importance vector is its mean Σx²/count per column (experts concatenated), normalised
to sum 1. KL needs strictly positive probabilities, so both vectors are smoothed with KL_EPS
before the divergence: p' = (p + ε) / (1 + n·ε).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from imatrix.errors import ImatrixError
from imatrix.matrix import ImportanceMatrix
from imatrix.stats.compute import finite_or_null
from imatrix.stats.names import layer_number, split_name

KL_EPS = 1e-10


@dataclass
class Similarity:
    name: str  # tensor name, or the layer number as text for layer rows
    n: int
    cossim: float
    sym_kl: float


@dataclass
class Comparison:
    source_a: str
    source_b: str
    tensors: list[Similarity] = field(default_factory=list)
    layers: list[Similarity] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "a": self.source_a,
            "b": self.source_b,
            "tensors": [finite_or_null(asdict(row)) for row in self.tensors],
            "layers": [finite_or_null(asdict(row)) for row in self.layers],
            "only_in_a": self.only_a,
            "only_in_b": self.only_b,
        }


def importance_vector(matrix: ImportanceMatrix, name: str) -> np.ndarray:
    """Mean Σx²/count per column (divided in float64), all experts concatenated; 0 for experts without tokens."""
    stats = matrix.tensors[name]
    counts = stats.counts.astype(np.float64)
    means = stats.sums.astype(np.float64) / np.where(counts > 0, counts, 1.0)[:, None]
    means[counts == 0] = 0.0
    return means.ravel()


def normalise(values: np.ndarray) -> np.ndarray:
    total = values.sum()
    if total <= 0:
        return np.full(values.shape, 1.0 / values.size)
    return values / total


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / norms) if norms > 0 else 0.0


def symmetric_kl(a: np.ndarray, b: np.ndarray) -> float:
    """KL(p‖q) + KL(q‖p) = Σ (p − q)(ln p − ln q) of the smoothed normalised vectors."""
    p, q = _smooth(normalise(a)), _smooth(normalise(b))
    return float(np.sum((p - q) * (np.log(p) - np.log(q))))


def _smooth(p: np.ndarray) -> np.ndarray:
    return (p + KL_EPS) / (1.0 + p.size * KL_EPS)


def compare_matrices(a: ImportanceMatrix, b: ImportanceMatrix, source_a: str = "A", source_b: str = "B") -> Comparison:
    common = sorted(set(a.tensors) & set(b.tensors), key=_block_order)
    if not common:
        raise ImatrixError(f"{source_b}: no tensor in common with {source_a} (different architectures?)")
    for name in common:
        shape_a, shape_b = a.tensors[name].sums.shape, b.tensors[name].sums.shape
        # a legacy .dat stores an expert stack as one row of per-expert means: the same vector
        legacy_stack = 1 in (shape_a[0], shape_b[0]) and a.tensors[name].sums.size == b.tensors[name].sums.size
        if shape_a != shape_b and not legacy_stack:
            raise ImatrixError(
                f"{source_b}: tensor '{name}' has shape {list(shape_b)} but {list(shape_a)} in {source_a}"
                " (different architectures?)"
            )
    vectors = {name: (importance_vector(a, name), importance_vector(b, name)) for name in common}
    result = Comparison(source_a, source_b)
    result.tensors = [_similarity(name, *vectors[name]) for name in common]
    result.layers = _layer_similarities(vectors)
    result.only_a = sorted(set(a.tensors) - set(b.tensors))
    result.only_b = sorted(set(b.tensors) - set(a.tensors))
    return result


def _block_order(name: str) -> tuple[int, str]:
    return layer_number(split_name(name)[0]), name


def _similarity(label: str, va: np.ndarray, vb: np.ndarray) -> Similarity:
    return Similarity(label, int(va.size), cosine(va, vb), symmetric_kl(va, vb))


def _layer_similarities(vectors: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[Similarity]:
    """Per block: the block's tensors concatenated (in name order) and normalised together."""
    groups: dict[int, list[str]] = {}
    for name in vectors:
        groups.setdefault(layer_number(split_name(name)[0]), []).append(name)
    rows = []
    for layer in sorted(key for key in groups if key >= 0):
        names = sorted(groups[layer])
        va = np.concatenate([vectors[n][0] for n in names])
        vb = np.concatenate([vectors[n][1] for n in names])
        rows.append(_similarity(str(layer), va, vb))
    return rows


def render_comparison(result: Comparison, as_json: bool = False) -> str:
    if as_json:
        return json.dumps(result.to_dict(), indent=2) + "\n"
    lines = [f"Comparing {result.source_a} (A) with {result.source_b} (B): {len(result.tensors)} common tensors", ""]
    lines.append(f"{'Tensor':<40}\t{'N':>7}\t{'CosSim':>8}\t{'SymKL':>12}")
    lines.append("=" * 76)
    lines += [f"{row.name:<40}\t{row.n:7d}\t{row.cossim:8.6f}\t{row.sym_kl:12.6e}" for row in result.tensors]
    lines += ["", f"{'Layer':>5}\t{'N':>7}\t{'CosSim':>8}\t{'SymKL':>12}", "=" * 44]
    lines += [f"{row.name:>5}\t{row.n:7d}\t{row.cossim:8.6f}\t{row.sym_kl:12.6e}" for row in result.layers]
    for label, names in (("A", result.only_a), ("B", result.only_b)):
        lines += ["", f"Only in {label} ({len(names)}):"] + [f"  {name}" for name in names]
    return "\n".join(lines) + "\n"
