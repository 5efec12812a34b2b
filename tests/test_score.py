"""`bench score`: re-scoring saved samples without retraining, and refusing bad samples."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_PROFILE, bench


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny ddpm run scored with fd_domain only (`bench run --metrics`)."""
    results = tmp_path_factory.mktemp("score")
    r = bench(
        "run",
        "--methods",
        "ddpm",
        "--dataset",
        "synthetic",
        "--profile",
        TINY_PROFILE,
        "--device",
        "cpu",
        "--results",
        str(results),
        "--metrics",
        "fd_domain",
    )
    assert r.exit_code == 0, r.output
    (run_dir,) = (results / "runs").glob("ddpm-*")
    return run_dir


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())["metrics"]


def test_run_metrics_option_selects_metrics(finished_run: Path) -> None:
    assert set(metrics_of(finished_run)) == {"fd_domain"}


def test_score_adds_metrics_and_keeps_the_others(finished_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "results" / "runs" / finished_run.name
    shutil.copytree(finished_run.parent.parent, tmp_path / "results")
    fd_before = metrics_of(run_dir)["fd_domain"]["value"]
    ckpt_mtime = (run_dir / "checkpoint.pt").stat().st_mtime_ns
    r = bench("score", str(run_dir), "--metrics", "acc_cnn", "--device", "cpu")
    assert r.exit_code == 0, r.output
    after = metrics_of(run_dir)
    assert set(after) == {"fd_domain", "acc_cnn"} and after["fd_domain"]["value"] == fd_before
    assert 0 <= after["acc_cnn"]["value"] <= 100
    assert (run_dir / "checkpoint.pt").stat().st_mtime_ns == ckpt_mtime  # nothing retrained
    r = bench("score", str(run_dir), "--metrics", "fd_domain", "--device", "cpu")
    assert r.exit_code == 0 and metrics_of(run_dir)["fd_domain"]["value"] == pytest.approx(fd_before)
    r = bench("report", "--results", str(tmp_path / "results"), "--out", str(tmp_path / "rep"))
    assert r.exit_code == 0 and "acc_cnn" in r.stdout


def _corrupt(finished_run: Path, tmp_path: Path, **arrays) -> Path:
    shutil.copytree(finished_run.parent.parent, tmp_path / "results")
    run_dir = tmp_path / "results" / "runs" / finished_run.name
    with np.load(run_dir / "samples.npz") as z:
        data = {"images": z["images"], "labels": z["labels"]}
    data |= {k: v(data[k]) for k, v in arrays.items()}
    np.savez(run_dir / "samples.npz", **data)
    return run_dir


@pytest.mark.parametrize(
    "change, message",
    [
        ({"images": lambda x: x.astype(np.float32)}, "samples must be uint8"),
        ({"images": lambda x: x[:, :, :8]}, "samples must have shape [N, 1, 16, 16]"),
        ({"labels": lambda y: y + 5}, "labels must be in 0..9"),
        ({"labels": lambda y: y[:-1]}, "labels must have shape"),
    ],
)
def test_bad_samples_are_one_line_errors(finished_run: Path, tmp_path: Path, change, message) -> None:
    run_dir = _corrupt(finished_run, tmp_path, **change)
    before = (run_dir / "metrics.json").read_text()
    r = bench("score", str(run_dir), "--device", "cpu")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and message in r.stderr, r.stderr
    assert (run_dir / "metrics.json").read_text() == before


def test_unknown_metric_and_non_run_folder(finished_run: Path, tmp_path: Path) -> None:
    r = bench("score", str(finished_run), "--metrics", "fid_magic")
    assert r.exit_code == 2 and "unknown metric 'fid_magic'; available:" in r.stderr
    r = bench("score", str(tmp_path))
    assert r.exit_code == 2 and "not a run folder" in r.stderr
    r = bench("run", "--methods", "ddpm", "--dataset", "synthetic", "--metrics", "nope", "--results", str(tmp_path))
    assert r.exit_code == 2 and "unknown metric 'nope'" in r.stderr


def test_profile_metric_set_and_inception_weights_reach_the_metrics(tmp_path: Path, monkeypatch) -> None:
    """A profile's eval.metrics is the default set; --inception-weights reaches the Inception metrics."""
    import bench.metrics as metrics_mod
    from bench.grid.runner import Runner
    from bench.grid.store import Store

    profile = tmp_path / "p.toml"
    profile.write_text(Path(TINY_PROFILE).read_text().replace("[eval]\n", '[eval]\nmetrics = ["fd_domain"]\n', 1))
    r = bench(
        "run",
        "--methods",
        "ddpm",
        "--dataset",
        "synthetic",
        "--profile",
        str(profile),
        "--device",
        "cpu",
        "--results",
        str(tmp_path / "res"),
    )
    assert r.exit_code == 0, r.output
    (run_dir,) = (tmp_path / "res" / "runs").glob("ddpm-*")
    assert set(metrics_of(run_dir)) == {"fd_domain"}

    seen = {}

    def fake_inception(fake, real, *, weights, metrics, cuda, cache_name):
        seen.update(weights=weights, metrics=list(metrics), n=len(fake), cache_name=cache_name)
        return {"fid_inception": {"value": 12.5, "extractor": "inception-v3-compat"}}

    monkeypatch.setattr(metrics_mod, "inception_metrics", fake_inception)
    runner = Runner(
        Store(tmp_path / "res"),
        device=torch.device("cpu"),
        metrics=("fid_inception",),
        inception_weights="/weights/inception.pth",
    )
    runner.score(run_dir)
    assert seen == {"weights": "/weights/inception.pth", "metrics": ["fid"], "n": 40, "cache_name": "synthetic-train"}
    assert metrics_of(run_dir)["fid_inception"]["value"] == 12.5 and "fd_domain" in metrics_of(run_dir)
