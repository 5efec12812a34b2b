"""A non-editable install must carry methods/ and baselines/ as bench.methods / bench.baselines."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_wheel_maps_method_folders_into_bench(tmp_path: Path) -> None:
    # build from a copy: setuptools would otherwise reuse a stale build/ folder of the checkout, whose old
    # files hide a package missing from pyproject.toml
    src = tmp_path / "src"
    shutil.copytree(
        ROOT, src, ignore=shutil.ignore_patterns(".venv", "build", "results", "reports", ".git", "*.egg-info")
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for required in (
        "bench/cli/__init__.py",
        "bench/cli/privacy.py",
        "bench/baselines/dpdm.py",
        "bench/baselines/ddpm.py",
        "bench/methods/__init__.py",
        "bench/grid/profiles/smoke.toml",
        "bench/grid/profiles/paper.toml",
        "bench/reference/published_results.csv",
        "bench/reference/papers.toml",
        "bench/nets/unet.py",
        "bench/report/templates/report.html.j2",  # the HTML report's template, CSS and JS
        "bench/report/templates/report.css",
        "bench/report/templates/report.js",
    ):
        assert required in names, required
    # every module of the source tree is in the wheel (a sub-package missing from pyproject's list is not)
    for folder, package in (("bench", "bench"), ("methods", "bench/methods"), ("baselines", "bench/baselines")):
        for path in (ROOT / folder).rglob("*.py"):
            assert f"{package}/{path.relative_to(ROOT / folder).as_posix()}" in names, path
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"bench"}, f"generic top-level names would collide with other projects: {top}"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "bench = bench.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
