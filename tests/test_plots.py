"""Plots from a results folder made by tiny real runs: the drawn data equal the stored values, and the
files are real PNG and PDF."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench.errors import BenchError
from bench.grid.store import Store
from bench.report import plots
from bench.report.frame import REAL_LABEL, load_frame
from tests.conftest import TINY_PROFILE, bench

METRICS = ("fd_domain", "fid_inception", "acc_cnn")  # fid_inception: no weights in tests, all n/a


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """`bench run`: dpdm at ε = 1 and 10 and the non-private ddpm, seeds 0 and 1, on the tiny profile."""
    root = tmp_path_factory.mktemp("plots-results")
    r = bench(
        *("run", "--methods", "dpdm,ddpm", "--eps", "1,10", "--seeds", "0,1", "--dataset", "synthetic"),
        *("--profile", TINY_PROFILE, "--device", "cpu", "--results", str(root), "--metrics", ",".join(METRICS)),
    )
    assert r.exit_code == 0, r.output
    return root


@pytest.fixture(scope="module")
def frame(results: Path):
    return load_frame(Store(results))


def stored(results: Path) -> list[dict]:
    """What each run wrote to disk, read without the index: method, ε label, seed, metrics, cost."""
    out = []
    for d in sorted((results / "runs").iterdir()):
        cfg = json.loads((d / "config.json").read_text())
        met = json.loads((d / "metrics.json").read_text())
        eps = "∞" if cfg["epsilon"] is None else f"{cfg['epsilon']:g}"
        out.append({"method": cfg["method"], "eps": eps, "seed": cfg["seed"], "dir": d} | met)
    return out


def test_eps_positions_put_infinity_last_and_apart() -> None:
    pos = plots.eps_positions(["10", "∞", "0.2", "1"])
    assert pos["0.2"] == pytest.approx(math.log10(0.2)) and pos["1"] == 0 and pos["10"] == 1
    assert pos["∞"] >= pos["10"] + 1
    assert plots.eps_positions(["∞"]) == {"∞": 0.0}


def test_metric_vs_eps_draws_means_and_stds_over_seeds(results: Path, frame) -> None:
    fig = plots.metric_vs_eps(frame, "acc_cnn")
    (ax,) = fig.axes
    lines = {c.get_label(): c for c in ax.containers}
    assert set(lines) == {"dpdm", "ddpm"}
    pos = plots.eps_positions(["1", "10", "∞"])
    for method, eps in (("dpdm", ["1", "10"]), ("ddpm", ["∞"])):
        container = lines[method]
        data_line, _, (bars,) = container.lines
        values = [
            [r["metrics"]["acc_cnn"]["value"] for r in stored(results) if r["method"] == method and r["eps"] == e]
            for e in eps
        ]
        assert all(len(v) == 2 for v in values)  # two seeds a point
        np.testing.assert_allclose(data_line.get_xdata(), [pos[e] for e in eps])
        np.testing.assert_allclose(data_line.get_ydata(), [np.mean(v) for v in values])
        half = [(seg[1][1] - seg[0][1]) / 2 for seg in bars.get_segments()]
        np.testing.assert_allclose(half, [np.std(v, ddof=1) for v in values])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "10", "∞"]
    assert "acc_cnn" in ax.get_ylabel()


def test_the_real_data_row_is_a_level_not_a_point(results: Path, frame) -> None:
    real = [r for r in stored(results) if r["method"] == "real"]
    if not real:
        pytest.skip("`bench run` wrote no real-data row")
    (ax,) = plots.metric_vs_eps(frame, "fd_domain").axes
    (level,) = [line for line in ax.get_lines() if line.get_label() == REAL_LABEL]
    assert list(level.get_ydata()) == [real[0]["metrics"]["fd_domain"]["value"]] * 2
    assert REAL_LABEL not in {c.get_label() for c in ax.containers}


def test_cost_vs_quality_uses_fit_and_sample_hours(results: Path, frame) -> None:
    fig = plots.cost_vs_quality(frame, "fd_domain")
    (ax,) = fig.axes
    assert ax.get_xlabel().startswith("CPU-hours")
    drawn = {line.get_label(): line for line in ax.get_lines()}
    runs = stored(results)
    for method, eps in (("dpdm", ["1", "10"]), ("ddpm", ["∞"])):
        cell = [[r for r in runs if r["method"] == method and r["eps"] == e] for e in eps]
        hours = [np.mean([(r["cost"]["fit_s"] + r["cost"]["sample_s"]) / 3600 for r in c]) for c in cell]
        values = [np.mean([r["metrics"]["fd_domain"]["value"] for r in c]) for c in cell]
        np.testing.assert_allclose(drawn[method].get_xdata(), hours)
        np.testing.assert_allclose(drawn[method].get_ydata(), values)


def test_sample_grids_show_each_methods_lowest_seed(results: Path, frame) -> None:
    for eps, method in (("10", "dpdm"), ("∞", "ddpm")):
        fig = plots.sample_grids(frame, "synthetic", eps)
        (ax,) = [a for a in fig.axes if a.images]
        assert ax.get_title() == f"{method} (seed 0)"
        (run,) = [r for r in stored(results) if r["method"] == method and r["eps"] == eps and r["seed"] == 0]
        with np.load(run["dir"] / "samples.npz") as z:
            images, labels = z["images"], z["labels"]
        mosaic = ax.images[0].get_array()
        h, w = images.shape[2:]
        per_class = np.bincount(labels).max()
        assert mosaic.shape == (10 * (h + 2) + 2, per_class * (w + 2) + 2)
        first_of = {k: images[np.flatnonzero(labels == k)[0], 0] for k in range(10)}
        for k in (0, 9):  # the first sample of class k opens row k
            y = 2 + k * (h + 2)
            np.testing.assert_array_equal(mosaic[y : y + h, 2 : 2 + w], first_of[k])
        assert [t.get_text() for t in ax.get_yticklabels()][:1] == ["horizontal bar 0"]


def _valid(path: Path) -> bool:
    head = path.read_bytes()
    if path.suffix == ".png":
        return head.startswith(b"\x89PNG\r\n\x1a\n") and b"IEND" in head[-12:]
    return head.startswith(b"%PDF-") and b"%%EOF" in head[-16:]


def test_write_plots_writes_png_and_pdf_of_every_figure(results: Path, frame, tmp_path: Path) -> None:
    files = plots.write_plots(Store(results), tmp_path / "a")
    stems = {"metric_vs_eps_fd_domain", "metric_vs_eps_acc_cnn", "cost_fd_domain", "cost_acc_cnn"}
    stems |= {"samples_synthetic_eps1", "samples_synthetic_eps10", "samples_synthetic_epsinf"}
    assert sorted(p.name for p in files) == sorted(f"{s}.{fmt}" for s in stems for fmt in ("png", "pdf"))
    assert all(p.parent == tmp_path / "a" and _valid(p) for p in files)
    from_frame = plots.write_plots(frame, tmp_path / "b", metrics=["acc_cnn", "fid_inception"])
    assert {p.name for p in from_frame} == {
        f"{s}.{fmt}" for s in stems if "fd_domain" not in s for fmt in ("png", "pdf")
    }  # fid_inception has no value (no Inception weights): no figure


def test_bad_input_is_a_one_line_error(frame, tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="unknown metric 'nope'"):
        plots.write_plots(frame, tmp_path, metrics=["nope"])
    with pytest.raises(BenchError, match="no values of metric 'fid_inception'"):
        plots.metric_vs_eps(frame, "fid_inception")
    with pytest.raises(BenchError, match="no finished runs on synthetic at ε = 3"):
        plots.sample_grids(frame, "synthetic", "3")
    with pytest.raises(BenchError, match="no runs in"):
        plots.write_plots(Store(tmp_path / "empty"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
