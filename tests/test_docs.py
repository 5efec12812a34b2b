"""The project's own documentation (docs/): its example plugin runs, its links resolve, the rules the code cites
exist, and nothing in the project points outside it."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import TINY_PROFILE, bench

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
EXAMPLE = str(DOCS / "examples" / "noisy_class_means.py")


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / n for n in names if Path(n).suffix in {".py", ".md", ".toml", ".txt", ".cfg", ""} and
            (ROOT / n).is_file()]  # fmt: skip


def test_the_example_plugin_runs_a_grid_and_its_card_recomputes(tmp_path: Path) -> None:
    """docs/examples/noisy_class_means.py, as docs/plugins.md tells a user to run it: listed, trained at two ε,
    scored, ε recomputed from its ledger within each target; a bad setting is one line."""
    listed = bench("list", "--plugin", EXAMPLE)
    assert listed.exit_code == 0 and "noisy-class-means" in listed.stdout
    r = bench("run", "--plugin", EXAMPLE, "--methods", "noisy-class-means", "--eps", "1,10", "--dataset", "synthetic",
              "--profile", TINY_PROFILE, "--device", "cpu", "--no-real", "--results", str(tmp_path))  # fmt: skip
    assert r.exit_code == 0, r.output
    cards = [json.loads(p.read_text()) for p in sorted((tmp_path / "runs").glob("*/privacy.json"))]
    assert sorted(c["target_epsilon"] for c in cards) == [1.0, 10.0]
    for card in cards:
        assert card["guarantee"] == "end-to-end" and 0 < card["epsilon"] <= card["target_epsilon"] * (1 + 1e-6)
        assert card["stages"] == [{"name": "class sums and counts", "mechanism": "gaussian",
                                   "noise_multiplier": card["stages"][0]["noise_multiplier"], "count": 1}]  # fmt: skip
    bad = bench("run", "--plugin", EXAMPLE, "--methods", "noisy-class-means", "--eps", "1", "--dataset", "synthetic",
                "--set", "pixel_std=-1", "--profile", TINY_PROFILE, "--results", str(tmp_path / "bad"))  # fmt: skip
    assert bad.exit_code == 2 and "pixel_std must be ≥ 0" in bad.output and "Traceback" not in bad.output


def test_every_rule_the_code_cites_is_in_docs_privacy() -> None:
    rules = {int(n) for n in re.findall(r"^(\d+)\. \*\*", (DOCS / "privacy.md").read_text(), flags=re.M)}
    assert rules == set(range(1, 9))
    cited = set()
    for path in tracked_text_files():
        text = path.read_text(errors="replace")
        for one, more in re.findall(r"docs/privacy\.md,? rules? (\d+)(?: and (\d+))?", text):
            cited |= {int(one), *([int(more)] if more else [])}
    assert cited and cited <= rules, cited - rules


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_links_in_the_docs_resolve(page: str) -> None:
    text = (DOCS / page).read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (DOCS / target).exists(), f"{page} links to {target}, which is not there"


def test_no_file_of_the_project_points_outside_it() -> None:
    """A user of the package never sees the design notes the project was built from: no tracked file refers to
    them (their names, or a path above the project)."""
    outside = re.compile(r"\.\./shared|\b(?:PRIVACY|DESIGN|METHODS|EVALUATION|PERFORMANCE|STYLE)\.md\b")
    offenders = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in tracked_text_files()
                 for m in [outside.search(p.read_text(errors="replace"))] if m]  # fmt: skip
    assert offenders == []
