"""Self-contained HTML (figures inlined as base64 PNG) and PNG reports of an imatrix."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from imatrix.errors import ImatrixError
from imatrix.formats.atomic import atomic_path
from imatrix.matrix import ImportanceMatrix
from imatrix.stats.compute import Statistics, compute_statistics
from imatrix.stats.figures import expert_figure, heatmap_figure, layer_curves_figure, skew_figure

DPI = 100
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { padding: 0.2em 0.8em; border-bottom: 1px solid #ddd; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
table.summary td { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
"""


def build_figures(matrix: ImportanceMatrix, stats: Statistics | None = None) -> dict[str, Figure]:
    """Report figures keyed by a short file-name-safe id; the expert map only for MoE files."""
    stats = stats or compute_statistics(matrix, "preferred")
    figures = {
        "importance_heatmap": heatmap_figure(matrix),
        "layer_curves": layer_curves_figure(stats),
        "skewed_tensors": skew_figure(matrix, stats),
    }
    experts = expert_figure(matrix)
    if experts is not None:
        figures["expert_counts"] = experts
    return figures


def figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def write_report(matrix: ImportanceMatrix, output: str | Path, source: str = "") -> Path:
    """`.html` -> one self-contained page; `.png` -> all figures stacked in one image."""
    target = Path(output)
    suffix = target.suffix.lower()
    if suffix not in (".html", ".htm", ".png"):
        raise ImatrixError(f"{target}: report output must end in .html or .png")
    stats = compute_statistics(matrix, "preferred", source)
    figures = build_figures(matrix, stats)
    data = render_html(matrix, stats, figures, source).encode() if suffix != ".png" else stacked_png(figures)
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return target


def write_png_dir(matrix: ImportanceMatrix, directory: str | Path, source: str = "") -> list[Path]:
    folder = Path(directory)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImatrixError(f"{folder}: cannot create the folder: {exc.strerror}") from None
    written = []
    for key, fig in build_figures(matrix, compute_statistics(matrix, "preferred", source)).items():
        path = folder / f"{key}.png"
        with atomic_path(path) as tmp:
            tmp.write_bytes(figure_png(fig))
        written.append(path)
    return written


def stacked_png(figures: dict[str, Figure]) -> bytes:
    """All figures one under the other on a white background."""
    images = [_rgba(fig) for fig in figures.values()]
    width = max(image.shape[1] for image in images)
    padded = [np.pad(im, ((0, 0), (0, width - im.shape[1]), (0, 0)), constant_values=255) for im in images]
    stacked = np.concatenate(padded, axis=0)
    fig = Figure(figsize=(stacked.shape[1] / DPI, stacked.shape[0] / DPI), dpi=DPI)
    fig.figimage(stacked, 0, 0)
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer)
    return buffer.getvalue()


def _rgba(fig: Figure) -> np.ndarray:
    fig.set_dpi(DPI)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


def render_html(matrix: ImportanceMatrix, stats: Statistics, figures: dict[str, Figure], source: str) -> str:
    title = f"imatrix report: {Path(source).name}" if source else "imatrix report"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        _summary_table(matrix, stats, source),
    ]
    for key, fig in figures.items():
        encoded = base64.b64encode(figure_png(fig)).decode("ascii")
        caption = _CAPTIONS.get(key, key)
        parts.append(f"<h2>{html.escape(caption)}</h2>")
        parts.append(
            f'<figure id="{key}"><img alt="{html.escape(caption)}" src="data:image/png;base64,{encoded}"></figure>'
        )
    parts.append(_layer_table(stats))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


_CAPTIONS = {
    "importance_heatmap": "Mean importance per layer and tensor kind",
    "layer_curves": "Per-layer ZD, cosine similarity and L₂ distance to the previous layer",
    "skewed_tensors": "Per-column importance of the most skewed tensors",
    "expert_counts": "Tokens per expert and layer",
}


def _summary_table(matrix: ImportanceMatrix, stats: Statistics, source: str) -> str:
    experts = sum(1 for t in matrix.tensors.values() if t.n_mat > 1)
    rows = [
        ("file", source or "-"),
        ("tensors", str(len(matrix.tensors))),
        ("expert tensors", str(experts)),
        ("layers", str(len(stats.layers))),
        ("chunks", str(matrix.chunk_count)),
        ("chunk size", str(matrix.chunk_size)),
        ("max token count", str(matrix.max_count())),
        ("datasets", ", ".join(matrix.datasets) or "-"),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="summary">{body}</table>'


def _layer_table(stats: Statistics) -> str:
    head = (
        "<tr><th>layer</th><th>tensor values</th><th>mean Σ(Act²)</th><th>ZD %</th>"
        "<th>CosSim</th><th>L₂</th><th>ECS</th></tr>"
    )
    body = "".join(
        f"<tr><td>{r.layer}</td><td>{r.n}</td><td>{r.sum_sq:.2f}</td><td>{100 * r.zd:.2f}</td>"
        f"<td>{r.cossim:.4f}</td><td>{r.l2:.4f}</td><td>{r.ecs:.4f}</td></tr>"
        for r in stats.layers
    )
    return f"<h2>Per-layer statistics (preferred mode)</h2><table>{head}{body}</table>"
