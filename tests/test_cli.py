"""The command line: happy paths, and every kind of bad input as one line + exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import TESTS, TINY_PROFILE, bench


def tiny_run(results: Path, *extra: str):
    return bench(
        "run",
        "--methods",
        "dpdm",
        "--eps",
        "10",
        "--dataset",
        "synthetic",
        "--profile",
        TINY_PROFILE,
        "--device",
        "cpu",
        "--results",
        str(results),
        *extra,
    )


def assert_one_line_error(result, pattern: str) -> None:
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert "Traceback" not in result.output + err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    assert pattern in err, err


def test_list_shows_methods_datasets_profiles() -> None:
    r = bench("list")
    assert r.exit_code == 0
    for word in ("dpdm", "ddpm", "fmnist", "mnist", "synthetic", "smoke", "paper", "fd_domain", "acc_cnn"):
        assert word in r.stdout


def test_list_with_a_plugin_file() -> None:
    r = bench("list", "--plugin", str(TESTS / "plugins" / "good_plugin.py"))
    assert r.exit_code == 0 and "noisy-means" in r.stdout


def test_a_broken_plugin_file_is_a_one_line_error_and_nothing_runs(tmp_path: Path) -> None:
    for args in (["list"], ["run", "--methods", "dpdm", "--eps", "10", "--dataset", "synthetic", "--profile",
                            TINY_PROFILE, "--results", str(tmp_path / "r")]):  # fmt: skip
        r = bench(*args, "--plugin", str(TESTS / "plugins" / "broken_plugin.py"))
        assert r.exit_code == 2, r.output
        assert "plugin file" in r.stderr and "broken_plugin.py failed to load" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not (tmp_path / "r").exists()  # nothing ran


def test_dry_run_prints_resolved_configs_and_writes_nothing(tmp_path: Path) -> None:
    r = tiny_run(tmp_path / "res", "--dry-run", "--set", "lr=0.01", "--seeds", "0,1")
    assert r.exit_code == 0, r.output
    plans = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(plans) == 2 and {p["seed"] for p in plans} == {0, 1}
    assert all(p["config"]["lr"] == 0.01 and p["delta"] == 1e-5 for p in plans)
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "nope"], "unknown method 'nope'"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--profile", "fast"], "unknown profile 'fast'"),
        (["--eps", "0"], "ε must be a finite number > 0"),
        (["--eps", "-1"], "ε must be a finite number > 0"),
        (["--eps", "abc"], "'abc' is not a number"),
        (["--eps", "inf"], "ε must be a finite number > 0"),
        (["--delta", "1.5"], "--delta must be in (0, 1)"),
        (["--delta", "0.01"], "δ"),  # ≥ 1/N for 2,000 records
        (["--accountant", "gdp"], "gdp"),
        (["--set", "lrr=1"], "unknown key 'lrr'"),
        (["--set", "epochs=abc"], "expected a number"),
        (["--set", "eval.n_gen=0"], "n_gen"),
        (["--seeds", "x"], "--seeds"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    base = {"--methods": "dpdm", "--eps": "10", "--dataset": "synthetic", "--profile": TINY_PROFILE}
    flags = dict(zip(args[::2], args[1::2], strict=True))
    argv = ["run"]
    for k, v in (base | flags).items():
        argv += [k, v]
    r = bench(*argv, "--device", "cpu", "--results", str(tmp_path / "res"))
    assert_one_line_error(r, message)
    assert not (tmp_path / "res").exists()


def test_missing_data_names_where_it_looked(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    r = bench(
        "run",
        "--methods",
        "dpdm",
        "--eps",
        "1",
        "--dataset",
        "mnist",
        "--data-root",
        str(empty),
        "--profile",
        TINY_PROFILE,
        "--device",
        "cpu",
        "--results",
        str(tmp_path / "res"),
    )
    assert_one_line_error(r, str(empty))
    assert not (tmp_path / "res" / "runs").exists() or not any((tmp_path / "res" / "runs").iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu(tmp_path: Path) -> None:
    r = bench("run", "--methods", "dpdm", "--dataset", "synthetic", "--device", "cuda", "--results", str(tmp_path))
    assert_one_line_error(r, "no CUDA device")


def test_unreadable_results_folder(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert_one_line_error(tiny_run(not_a_dir), "not usable")
    assert_one_line_error(bench("report", "--results", str(tmp_path / "missing")), "does not exist")


def test_corrupt_results_database(tmp_path: Path) -> None:
    res = tmp_path / "res"
    res.mkdir()
    (res / "bench.sqlite").write_bytes(b"this is not a database" * 100)
    assert_one_line_error(tiny_run(res), "bench.sqlite")


def test_report_on_empty_results(tmp_path: Path) -> None:
    (tmp_path / "res").mkdir()
    assert_one_line_error(bench("report", "--results", str(tmp_path / "res")), "no runs")
