"""Text table (llama-imatrix's layout), JSON and CSV renderings of `Statistics`."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, fields

from imatrix.stats.compute import LayerRow, Statistics, TensorRow

_LEGACY_HEAD = (
    " Layer",
    "       Tensor",
    "          Σ(Act²)",
    "  Min",
    "            Max",
    "           μ",
    "   σ",
    " % Active",
    "N",
    "   Entropy",
    "E (norm)",
    "ZD",
    "  CosSim",
)
_PREFERRED_HEAD = (
    " Layer",
    "       Tensor",
    "          L₂ Norm",
    "  Min",
    "            Max",
    "           μ",
    "   σ",
    " % Active",
    "N",
    "    H Norm",
    "     ECS",
    "ZD",
    "  CosSim",
)
_RULE = "=" * 169


def render(stats: Statistics, fmt: str = "table") -> str:
    if fmt == "json":
        return json.dumps(stats.to_dict(), indent=2) + "\n"
    if fmt == "csv":
        return render_csv(stats)
    return render_table(stats)


def render_table(stats: Statistics) -> str:
    legacy = stats.mode == "legacy"
    lines = [f"\nComputing statistics for {stats.source} ({len(stats.tensors)} tensors)\n"]
    lines.append("\t".join(_LEGACY_HEAD if legacy else _PREFERRED_HEAD))
    lines.append(_RULE)
    lines += [_tensor_line(row, legacy) for row in stats.tensors]
    lines.append(f"\nComputing weighted average statistics per layer ({len(stats.layers)} layers)\n")
    if legacy:
        lines.append("\t".join(("  Layer", "     μΣ(Act²)", "      μZD", "μCosSim")))
        lines.append("=" * 48)
    else:
        lines.append("\t".join(("  Layer", "       L₂ Norm", "       ZD", " CosSim", "     ECS")))
        lines.append("=" * 56)
    lines += [_layer_line(row, legacy) for row in stats.layers]
    return "\n".join(lines) + "\n\n"


def _tensor_line(row: TensorRow, legacy: bool) -> str:
    first = row.sum_sq if legacy else row.l2
    if legacy:
        last_two = f"{row.entropy:10.4f}\t{row.entropy_norm:6.2f}%"
    else:
        last_two = f"{row.entropy_norm:9.2f}%\t{row.ecs:8.4f}"
    return (
        f"{row.layer:>5}\t{row.kind:<20}\t{first:10.2f}\t{row.min:8.4f}\t{row.max:11.4f}\t{row.mean:6.2f}\t"
        f"{row.std:6.2f}\t{row.active * 100:8.2f}%\t{row.n:6d}\t{last_two}\t{100 * row.zd:10.2f}%\t{row.cossim:8.4f}"
    )


def _layer_line(row: LayerRow, legacy: bool) -> str:
    if legacy:
        return f"{row.layer:5d}\t{row.sum_sq:14.2f}\t{100 * row.zd:10.4f}%\t{row.cossim:6.4f}"
    return f"{row.layer:5d}\t{row.l2:14.4f}\t{100 * row.zd:8.4f}%\t{row.cossim:7.4f}\t{row.ecs:8.4f}"


def render_csv(stats: Statistics) -> str:
    """Two sections in one stream: tensor rows, then layer rows, each with a `scope` column."""
    out = io.StringIO()
    tensor_cols = [f.name for f in fields(TensorRow)]
    layer_cols = [f.name for f in fields(LayerRow)]
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["scope", *tensor_cols])
    for row in stats.tensors:
        values = asdict(row)
        writer.writerow(["tensor", *(_csv_value(values[c]) for c in tensor_cols)])
    writer.writerow([])
    writer.writerow(["scope", *layer_cols])
    for row in stats.layers:
        values = asdict(row)
        writer.writerow(["layer", *(_csv_value(values[c]) for c in layer_cols)])
    return out.getvalue()


def _csv_value(value: object) -> object:
    return repr(value) if isinstance(value, float) else value
