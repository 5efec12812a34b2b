"""Bad input as a new user would give it, through the real entry point (`bench.cli.main`, as the installed
`bench` runs it): every case is one error line on stderr (warnings aside), a non-zero exit, no traceback, and
the finished cell already in the results folder stays as it was."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from bench import cli
from bench.grid import registry
from bench.grid.store import Store
from tests.conftest import TESTS, TINY_PROFILE

GOOD = str(TESTS / "plugins" / "good_plugin.py")
BROKEN = str(TESTS / "plugins" / "broken_plugin.py")
RUN = ["run", "--dataset", "synthetic", "--profile", TINY_PROFILE, "--device", "cpu", "--no-real"]


def main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    """Exit status and the stderr lines that are not warnings, of `bench ARGS`."""
    registry._cache.clear()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli.main(list(args))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return int(stop.value.code or 0), [line for line in err.splitlines() if not line.startswith("warning:")]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results folder with one finished cell (noisy-means, ε = 10)."""
    root = tmp_path_factory.mktemp("results")
    registry._cache.clear()
    with pytest.raises(SystemExit) as stop:
        cli.main([*RUN, "--methods", "noisy-means", "--eps", "10", "--results", str(root), "--plugin", GOOD,
                  "--metrics", "fd_domain"])  # fmt: skip
    assert stop.value.code in (0, None)
    return root


def snapshot(root: Path) -> dict[str, object]:
    """What must not change: every finished run's metrics.json (bytes) and the index's run rows."""
    runs = {p.parent.name: p.read_bytes() for p in sorted((root / "runs").glob("*/metrics.json"))}
    rows = sorted((r["key"], r["status"]) for r in Store(root).rows()[0])
    return {"metrics": runs, "rows": rows}


CASES = {
    "eps not a number": (["--methods", "dpdm", "--eps", "abc"], "--eps: 'abc' is not a number"),
    "eps negative": (["--methods", "dpdm", "--eps", "-1"], "ε must be a finite number > 0"),
    "eps infinite": (["--methods", "dpdm", "--eps", "inf"], "ε must be a finite number > 0"),
    "unknown method": (["--methods", "nope"], "unknown method 'nope'; available:"),
    "unknown dataset": (["--methods", "dpdm", "--dataset", "nope"], "nope"),
    "seed with two minus signs": (["--methods", "dpdm", "--seeds", "0,--1"], "--seeds: '--1' is not an integer"),
    "seed given twice": (["--methods", "dpdm", "--seeds", "0,0"], "--seeds: 0 is given twice"),
    "delta out of range": (["--methods", "dpdm", "--delta", "2"], "--delta must be in (0, 1)"),
    "delta not a number": (["--methods", "dpdm", "--delta", "abc"], "Invalid value for '--delta'"),
    "device typo": (["--methods", "dpdm", "--device", "cuda:x"], "--device must be auto, cpu or cuda[:N]"),
    "device unknown": (["--methods", "dpdm", "--device", "tpu"], "--device must be auto, cpu or cuda[:N]"),
    "unknown option": (["--methods", "dpdm", "--epochs", "3"], "No such option: --epochs"),
    "field of the wrong type": (["--methods", "dpdm", "--set", "lr=abc"], "dpdm.lr: expected a number"),
    "choice out of range": (["--methods", "dpdm", "--set", "dp_mode=fastest"], "dp_mode must be one of"),
    "negative width": (["--methods", "dpdm", "--set", "base_channels=-4"], "base_channels must be"),
    "unknown field": (["--methods", "dpdm", "--set", "nosuch=1"], "unknown key 'nosuch'"),
    "field some methods lack": (["--methods", "dpdm,dpgan", "--set", "lr=1e-3"], "dpgan has no field 'lr'"),
    "scoped to a method not run": (["--methods", "dpdm", "--set", "dpgan.lr_d=1"], "'dpgan' is not a method"),
    "set without a value": (["--methods", "dpdm", "--set", "lr"], "--set expects key=value"),
    "bad eval setting": (["--methods", "dpdm", "--set", "eval.n_gen=-5"], "eval.n_gen must be a positive"),
    "missing profile file": (["--methods", "dpdm", "--profile", "/nowhere/p.toml"], "profile file /nowhere/p.toml"),
    "unknown profile": (["--methods", "dpdm", "--profile", "fastest"], "unknown profile 'fastest'"),
    "missing plugin file": (["--methods", "dpdm", "--plugin", "/nowhere/x.py"], "plugin file /nowhere/x.py"),
    "plugin failing at import": (["--methods", "broken", "--plugin", BROKEN], "broken_plugin.py failed to load"),
    "unknown metric": (["--methods", "dpdm", "--metrics", "fid_nope"], "fid_nope"),
    "missing inception weights": (["--methods", "dpdm", "--inception-weights", "/nowhere/w.pth"], "/nowhere/w.pth"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_run_options_are_one_line(case: str, results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args, message = CASES[case]
    before = snapshot(results)
    status, lines = main(capsys, *RUN, "--results", str(results), *args)
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert snapshot(results) == before


def test_bad_environment_and_other_commands_are_one_line(
    results: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(results)
    good_run = [*RUN, "--methods", "noisy-means", "--eps", "10", "--plugin", GOOD, "--results", str(results)]
    monkeypatch.setenv("BENCH_CHECKPOINT_EVERY", "abc")
    assert main(capsys, *good_run, "--force") == (2, ["error: BENCH_CHECKPOINT_EVERY must be a number of seconds ≥ 0, "
                                                      "got 'abc'"])  # fmt: skip
    monkeypatch.delenv("BENCH_CHECKPOINT_EVERY")
    privacy = ["privacy", "epsilon", "--sampling-rate", "0.01"]
    cases = [
        (["report", "--results", str(tmp_path / "none")], "does not exist"),
        (["report", "--results", str(results), "--format", "pdf"], "unknown format 'pdf'"),
        (["report", "--results", str(results), "--metrics", "nope"], "nope"),
        (["score", str(tmp_path)], "samples.npz"),
        (["score", str(tmp_path / "none")], "is not a folder"),
        (["paper", "nope", "--results", str(results)], "nope"),
        (privacy + ["--noise-multiplier", "-1", "--steps", "10", "--delta", "1e-5"], "--noise-multiplier must be"),
        (privacy + ["--noise-multiplier", "1"], "Missing option"),
        (["nosuchcommand"], "No such command"),
        (["run", "--methods", "dpdm", "--results", "/proc/forbidden", "--dry-run"], None),  # planning only: fine
        (["run", *RUN[1:], "--methods", "dpdm", "--eps", "10", "--results", "/proc/forbidden"], "not usable"),
    ]
    for args, message in cases:
        status, lines = main(capsys, *args)
        if message is None:
            assert status == 0
            continue
        assert status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, lines)
    assert snapshot(results) == before


def test_a_typo_section_in_a_profile_and_a_data_root_file_are_one_line(
    results: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A profile section naming no method would be ignored (the method trains with its defaults); a --data-root that
    is a file would never hold the data. Both stop before anything runs."""
    before = snapshot(results)
    typo = tmp_path / "typo.toml"
    typo.write_text(f'extends = "{TINY_PROFILE}"\n\n[dpdmm]\nlr = 1e-3\n')
    status, lines = main(capsys, "run", "--dataset", "synthetic", "--profile", str(typo), "--methods", "dpdm",
                         "--eps", "10", "--results", str(results))  # fmt: skip
    assert status == 2 and len(lines) == 1 and "section [dpdmm] names no method (known: " in lines[0], lines
    assert "dpdm, " in lines[0]
    file = tmp_path / "fmnist.gz"
    file.write_bytes(b"not a folder")
    status, lines = main(capsys, *RUN, "--methods", "dpdm", "--eps", "10", "--results", str(results),
                         "--data-root", str(file))  # fmt: skip
    assert status == 2 and len(lines) == 1 and "is a file, not a folder" in lines[0], lines
    assert snapshot(results) == before


def copy_of(results: Path, tmp_path: Path) -> Path:
    shutil.copytree(results, tmp_path / "copy")
    return tmp_path / "copy"


def test_a_corrupt_database_says_so_and_how_to_rebuild(
    results: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = copy_of(results, tmp_path)
    for name in ("bench.sqlite-wal", "bench.sqlite-shm"):
        (copy / name).unlink(missing_ok=True)
    (copy / "bench.sqlite").write_bytes(b"this is not a database" * 100)
    status, lines = main(capsys, "report", "--results", str(copy))
    assert status == 2 and len(lines) == 1 and "is corrupt" in lines[0] and "bench report --rebuild" in lines[0]
    (copy / "bench.sqlite").unlink()  # what the message says: move it away, rebuild from the run folders
    status, _ = main(capsys, "report", "--results", str(copy), "--rebuild", "--out", str(tmp_path / "rep"))
    assert status == 0 and snapshot(copy)["rows"] == snapshot(results)["rows"]


def test_a_newer_or_locked_database_says_what_to_do(
    results: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    copy = copy_of(results, tmp_path)
    with sqlite3.connect(copy / "bench.sqlite") as db:
        db.execute("PRAGMA user_version = 99")
    status, lines = main(capsys, "report", "--results", str(copy))
    assert status == 2 and len(lines) == 1 and "schema version 99, newer than this bench" in lines[0]
    with sqlite3.connect(copy / "bench.sqlite") as db:
        db.execute("PRAGMA user_version = 1")
    monkeypatch.setenv("BENCH_DB_TIMEOUT", "0.2")
    holder = sqlite3.connect(copy / "bench.sqlite", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing, for longer than the timeout
    try:
        status, lines = main(capsys, "report", "--results", str(copy))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert status == 2 and len(lines) == 1 and "is locked: another process has held it for over 0.2 s" in lines[0]


def test_corrupt_run_files_leave_the_other_cells_alone(
    results: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run folder with a corrupt config.json is left out of a rebuilt index with a warning naming it; a
    corrupt samples.npz makes `bench score` fail in one line; the finished cell stays."""
    copy = copy_of(results, tmp_path)
    broken = copy / "runs" / "noisy-means-synthetic-000000000000"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    status, _ = main(capsys, "report", "--results", str(copy), "--rebuild", "--out", str(tmp_path / "rep"))
    assert status == 0 and snapshot(copy)["rows"] == snapshot(results)["rows"]  # the broken folder left out
    (run,) = [p for p in (copy / "runs").iterdir() if p.name.startswith("noisy-means") and p != broken]
    (run / "samples.npz").write_bytes(b"garbage")
    status, lines = main(capsys, "score", str(run))
    assert status == 2 and len(lines) == 1 and "samples.npz" in lines[0]
    assert snapshot(copy)["metrics"] == snapshot(results)["metrics"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders: nothing to check as root")
def test_a_read_only_results_folder_is_one_line(results: Path, tmp_path: Path, capsys) -> None:
    copy = copy_of(results, tmp_path)
    for path in [copy, *copy.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        status, lines = main(capsys, *RUN, "--methods", "noisy-means", "--eps", "1", "--plugin", GOOD,
                             "--results", str(copy))  # fmt: skip
    finally:
        for path in [copy, *copy.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert status == 2 and len(lines) == 1 and "not usable" in lines[0]
