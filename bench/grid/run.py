"""Run a planned grid: check the data, execute the cells through an executor, then the real-data rows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bench.errors import BenchError
from bench.grid import registry
from bench.grid.executors import Executor, LocalExecutor
from bench.grid.planning import Job, RealRow, RunSpec
from bench.grid.runner import Runner
from bench.grid.store import read_json


@dataclass
class GridOutcome:
    """What a grid did: each cell's outcome ("done", "skipped", "failed"), the real-data rows' keys, and the
    datasets left out because their data is missing (with the reason)."""

    outcomes: list[tuple[RunSpec, str]]
    real_keys: set[str] = field(default_factory=set)
    missing_data: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # key -> one-line error of each failed cell or real row

    def count(self, outcome: str) -> int:
        return sum(o == outcome for _, o in self.outcomes)

    @property
    def failed(self) -> list[RunSpec]:
        return [spec for spec, o in self.outcomes if o == "failed"]


def older_code(r: Runner, specs: list[RunSpec]) -> dict[str, str]:
    """Finished cells (key -> what differs) whose config.json records other code than this one: the method's
    source or the harness changed since, without a new method version or RESULT_VERSION (so the key is the
    same and the cell is reused)."""
    out = {}
    for spec in specs:
        path = r.store.run_dir(spec.key) / "config.json"
        recorded = read_json(path).get("code") if path.is_file() else None
        if not isinstance(recorded, dict):
            continue
        now = registry.code_record(registry.get(spec.method, r.plugins))
        changed = [
            what
            for field_, what in (("method_source", f"{spec.method}'s source changed"), ("harness", "harness changed"))
            if recorded.get(field_) != now[field_]
        ]
        if changed:
            out[spec.key] = ", ".join(changed)
    return out


def run_grid(
    r: Runner,
    specs: list[RunSpec],
    *,
    real: bool = True,
    skip_missing_data: bool = False,
    executor: Executor | None = None,
    echo: Callable[[str], None] = lambda line: None,
) -> GridOutcome:
    """Execute a planned grid: the data of every dataset is loaded first (missing data fails before any training,
    or, with `skip_missing_data`, leaves that dataset's cells out), the cells run through `executor` (default:
    LocalExecutor) with the grid's progress bars, then each dataset's real-data row (`real`) unless every cell
    failed. `echo` gets the one-line messages the command prints."""
    from bench.allocator import keep_freed_memory
    from bench.ui import GridUI

    keep_freed_memory()  # per-example gradients reuse freed pages (bench.allocator)
    executor = executor or LocalExecutor()
    missing: dict[str, str] = {}
    for ds in dict.fromkeys(s.dataset for s in specs):
        try:
            r.dataset(ds, "train"), r.dataset(ds, "test")
        except BenchError as e:
            if not skip_missing_data:
                raise
            missing[ds] = str(e)
            echo(f"warning: {ds}: dataset not available, its cells are skipped: {e}")
    specs = [s for s in specs if s.dataset not in missing]
    with GridUI(len(specs)) as ui:
        outcomes = executor.run(r, list(specs), ui, echo)
    result = GridOutcome(list(zip(specs, outcomes, strict=True)), missing_data=missing)
    result.errors = {s.key: r.errors.get(s.key, "failed") for s in result.failed}
    if stale := older_code(r, [s for s, o in result.outcomes if o == "skipped"]):
        echo(
            f"note: {len(stale)} finished cell(s) reused, computed by older code of the same version "
            f"({'; '.join(sorted(set(stale.values())))}); `--force` recomputes them"
        )
    echo(
        f"{result.count('done')} run(s) done, {result.count('skipped')} already finished, "
        f"{result.count('failed')} failed; results in {r.store.root}"
    )
    if real and result.count("done") + result.count("skipped"):
        done = (s for s, o in result.outcomes if o != "failed")
        each = (RealRow(dataset=s.dataset, eval=s.eval, profile=s.profile, data_version=s.data_version) for s in done)
        rows: list[Job] = list({row.key: row for row in each}.values())
        with GridUI(len(rows), title="real-data rows", lines=False) as ui:
            row_outcomes = executor.run(r, rows, ui, echo)
        for row, outcome in zip(rows, row_outcomes, strict=True):
            said = {"skipped": "already finished", "failed": f"failed ({r.errors.get(row.key)})"}.get(outcome, outcome)
            echo(f"real-data row of {row.dataset}: {said}")
            if outcome == "failed":
                result.errors[row.key] = r.errors.get(row.key, "failed")
            else:
                result.real_keys.add(row.key)
    for key, error in result.errors.items():
        echo(f"error: run {key} failed: {error}; its log: {r.store.run_dir(key) / 'log.txt'}")
    return result
