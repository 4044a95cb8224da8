"""`imatrix report`: figures, self-contained HTML and PNG output, rendered by headless Chromium."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import matplotlib.image as mpimg
import numpy as np
import pytest

from imatrix.cli.main import main
from imatrix.formats import load_imatrix
from imatrix.matrix import ImportanceMatrix, TensorStats
from imatrix.stats import compute_statistics
from imatrix.stats.figures import mean_importance_grid, most_skewed
from imatrix.stats.report import build_figures

MOE = "moe/tiny-qwen3moe.c256.n8.imatrix.gguf"
DENSE = "imatrix/smollm2-f16.c512.n40.imatrix.gguf"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def moe(golden) -> ImportanceMatrix:
    return load_imatrix(golden / MOE)


@pytest.fixture(scope="module")
def moe_figures(moe):
    return build_figures(moe)


def _visible_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]


def test_moe_report_has_every_figure(moe_figures):
    assert list(moe_figures) == ["importance_heatmap", "layer_curves", "skewed_tensors", "expert_counts"]


def test_importance_heatmap(moe, moe_figures):
    layers, kinds, grid = mean_importance_grid(moe)
    ax = _visible_axes(moe_figures["importance_heatmap"])[0]
    image = ax.get_images()[0]
    assert image.get_array().shape == (len(kinds), len(layers)) == (8, 3)
    assert [t.get_text() for t in ax.get_yticklabels()] == kinds
    assert type(image.norm).__name__ == "LogNorm"
    name = "blk.2.ffn_up_exps.weight"
    stats = moe.tensors[name]
    expected = (stats.sums.astype(np.float64) / stats.counts[:, None]).mean()
    assert grid[kinds.index("ffn_up_exps"), 2] == pytest.approx(expected, rel=1e-5)


def test_layer_curves(moe, moe_figures):
    stats = compute_statistics(moe, "preferred")
    axes = _visible_axes(moe_figures["layer_curves"])
    assert [ax.get_ylabel() for ax in axes] == ["ZD", "CosSim", "L₂"]
    for ax in axes:
        (line,) = ax.get_lines()
        assert list(line.get_xdata()) == [0, 1, 2]
    np.testing.assert_allclose(axes[1].get_lines()[0].get_ydata(), [r.cossim for r in stats.layers])
    np.testing.assert_allclose(axes[2].get_lines()[0].get_ydata()[1:], [r.l2 for r in stats.layers][1:])


def test_skewed_tensor_histograms(moe, moe_figures):
    stats = compute_statistics(moe, "preferred")
    axes = _visible_axes(moe_figures["skewed_tensors"])
    names = most_skewed(stats)
    assert [ax.get_title() for ax in axes] == names
    lowest = min(stats.tensors, key=lambda row: row.entropy_norm)
    assert names[0] == lowest.name
    assert sum(patch.get_height() for patch in axes[0].patches) == lowest.n


def test_expert_heatmap_marks_experts_without_data():
    matrix = ImportanceMatrix(chunk_size=64)
    for layer in range(4):
        counts = np.full(6, 10)
        counts[layer] = 0
        counts[5] = 0 if layer == 2 else 7
        matrix.tensors[f"blk.{layer}.ffn_up_exps.weight"] = TensorStats(np.ones((6, 4), np.float32), counts)
        matrix.tensors[f"blk.{layer}.attn_q.weight"] = TensorStats(np.ones((1, 4), np.float32), [64])
    ax = _visible_axes(build_figures(matrix)["expert_counts"])[0]
    assert ax.get_images()[0].get_array().shape == (6, 4)
    marks = {tuple(map(int, xy)) for xy in ax.collections[0].get_offsets()}
    assert marks == {(0, 0), (1, 1), (2, 2), (3, 3), (2, 5)}  # (layer, expert)
    assert "5 expert×layer cells with no data" in ax.get_title()


def test_dense_file_has_no_expert_figure(golden):
    matrix = load_imatrix(golden / DENSE)
    layers, kinds, grid = mean_importance_grid(matrix)
    assert len(layers) == 30 and len(kinds) == 7 and np.isfinite(grid).all()
    assert "expert_counts" not in build_figures(matrix)


def _html_images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', html)]


@pytest.fixture(scope="module")
def moe_report(golden, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    html, png, png_dir = folder / "report.html", folder / "report.png", folder / "figs"
    assert main(["report", str(golden / MOE), "-o", str(html), "--png-dir", str(png_dir)]) == 0
    assert main(["report", str(golden / MOE), "-o", str(png)]) == 0
    return html, png, png_dir


def test_report_files(moe_report):
    html_path, png, png_dir = moe_report
    html = html_path.read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert not re.search(r'(src|href)="(?!data:)', html), "the page must not load anything"
    images = _html_images(html)
    assert len(images) == 4
    for data in images:
        assert mpimg.imread(io.BytesIO(data), format="png").shape[2] in (3, 4)
    stacked = mpimg.imread(png)
    assert stacked.shape[0] > 1000 and stacked.ndim == 3
    assert sorted(p.name for p in png_dir.iterdir()) == [
        "expert_counts.png",
        "importance_heatmap.png",
        "layer_curves.png",
        "skewed_tensors.png",
    ]
    for path in png_dir.iterdir():
        assert mpimg.imread(path).shape[0] > 100


_PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message)));
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0);
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = `images=${imgs.length} visible=${ok.length} errors=${window.__errors.length}`;
  document.body.appendChild(out);
});
</script>"""


def _chromium(*args: str, profile) -> subprocess.CompletedProcess:
    base = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    return subprocess.run(base + list(args), capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_report_renders_in_chromium(moe_report, tmp_path):
    html_path = moe_report[0]
    probe = tmp_path / "probe.html"
    probe.write_text(html_path.read_text().replace("</body>", _PROBE + "</body>"))
    result = _chromium("--virtual-time-budget=5000", "--dump-dom", probe.as_uri(), profile=tmp_path / "profile")
    found = re.search(r'<pre id="probe">images=(\d+) visible=(\d+) errors=(\d+)</pre>', result.stdout)
    assert found, result.stderr[-2000:]
    assert found.groups() == ("4", "4", "0")
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert console == []
    shot = tmp_path / "report.png"
    _chromium("--window-size=1280,3000", f"--screenshot={shot}", html_path.as_uri(), profile=tmp_path / "profile2")
    assert mpimg.imread(shot).shape[:2] == (3000, 1280)


def test_report_needs_an_output(golden, capsys):
    assert main(["report", str(golden / MOE)]) == 1
    assert "-o" in capsys.readouterr().err


def test_report_rejects_unknown_suffix(golden, tmp_path, capsys):
    assert main(["report", str(golden / MOE), "-o", str(tmp_path / "r.pdf")]) == 1
    assert ".html or .png" in capsys.readouterr().err


def test_report_checks_its_outputs_before_writing_any(golden, tmp_path, capsys):
    html, not_a_folder = tmp_path / "r.html", tmp_path / "file.png"
    not_a_folder.write_bytes(b"x")
    assert main(["report", str(golden / MOE), "-o", str(html), "--png-dir", str(not_a_folder)]) == 1
    assert "--png-dir is a file" in capsys.readouterr().err and not html.exists()
    assert main(["report", str(golden / MOE), "-o", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err


def test_png_folder_that_cannot_be_made(golden, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_bytes(b"x")
    assert main(["report", str(golden / MOE), "--png-dir", str(a_file / "sub")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot create the folder" in err and str(a_file / "sub") in err


def test_context_size_must_be_positive(golden, capsys):
    assert main(["report", str(golden / MOE), "-o", "r.html", "-c", "0"]) == 1
    assert "must be > 0" in capsys.readouterr().err
