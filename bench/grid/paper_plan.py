"""The grid side of `bench paper ID`: plan a paper's cells as the RunSpecs `bench run` would make, run the ones
not finished, score reused runs on the metrics the tables need, and record the plan for `bench report`.

bench.report.paper (the published data and the comparison) never imports this module: reporting reads the recorded plan
and the folder, and never plans or runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pandas as pd

from bench import data, grid
from bench.config import value_text
from bench.errors import BenchError
from bench.grid import registry
from bench.grid.planning import RunSpec
from bench.grid.store import Store, read_json
from bench.metrics import select_metrics
from bench.report.frame import sweep_text
from bench.report.paper import (
    NO_DATASET,
    NOT_IMPLEMENTED,
    SWEEP_CONFLICT,
    Cell,
    Paper,
    PaperPlan,
    Published,
    compare,
    config_setting,
    our_metric,
    paper_cells,
)


def plan_paper(
    paper: Paper,
    papers: dict[str, Paper],
    published: list[Published],
    *,
    profile: str,
    seeds: list[int],
    accountant: str = "rdp",
    sets: Iterable[str] = (),
    plugins: tuple[str, ...] = (),
    data_root: str | None = None,
    sweeps: Iterable[str] = (),
) -> PaperPlan:
    """Every cell of the paper with its status, and the RunSpecs (via grid.plan) of those we can produce. A row
    of a sweep table runs our method at the row's swept value; `sweeps` (`--sweep`) turn each row we can produce
    into one cell per combination of the values swept for its method. An item of `sets` or `sweeps` scoped to
    one method of the paper (METHOD.field) applies to that method's cells only."""
    methods = registry.methods(plugins)
    in_paper = {m for t in paper.tables for m in (*t.methods, *t.extra_methods)}
    cells: list[Cell] = []
    specs: dict[str, RunSpec] = {}
    planned: dict[tuple[Any, ...], dict[tuple[tuple[str, Any], ...], tuple[str, ...]]] = {}
    unavailable: dict[str, str] = {}  # dataset -> why its shape or size cannot be known ("": it can)
    for table, row in paper_cells(paper, papers, published):
        ours, why = our_metric(table, row)
        status = _status(row, why, methods, unavailable, data_root)
        mine_sets, mine_sweeps = _for_method(sets, row.method, in_paper), _for_method(sweeps, row.method, in_paper)
        if status is None and table.sweep and _gives(table.sweep.field, row.method, [*mine_sets, *mine_sweeps]):
            status = SWEEP_CONFLICT.format(field=table.sweep.field)
        if status is not None:
            cells.append(Cell(table=table, row=row, ours=ours, status=status, sweep=row.sweep))
            continue
        group = (row.method, row.dataset, row.epsilon, table.delta, *row.sweep.items())
        if group not in planned:
            planned_specs = grid.plan(
                methods=[row.method],
                epsilons=[row.epsilon],
                datasets=[row.dataset],
                seeds=seeds,
                delta=table.delta,
                accountant=accountant,
                profile=profile,
                sets=mine_sets,
                plugins=plugins,
                data_root=data_root,
                sweeps=[*mine_sweeps, *(f"{row.method}.{k}={value_text(v)}" for k, v in row.sweep.items())],
            )
            specs.update((s.key, s) for s in planned_specs if s.key not in specs)
            by_sweep: dict[tuple[tuple[str, Any], ...], list[str]] = {}
            for s in planned_specs:  # one cell per swept combination, its seeds together (not the reference rows)
                if s.method == row.method:
                    by_sweep.setdefault(tuple(s.sweep.items()), []).append(s.key)
            planned[group] = {sweep: tuple(keys) for sweep, keys in by_sweep.items()}
        cells += [Cell(table=table, row=row, ours=ours, status=None, keys=keys, sweep=dict(sweep))
                  for sweep, keys in planned[group].items()]  # fmt: skip
    needed = select_metrics({c.ours for c in cells if c.status is None}) if specs else ()
    settings = {key: config_setting(s.config_json) for key, s in specs.items()}
    return PaperPlan(paper=paper, cells=tuple(cells), specs=tuple(specs.values()), metrics=needed, settings=settings)


def _status(
    row: Published, why: str | None, methods: dict[str, Any], unavailable: dict[str, str], data_root: str | None
) -> str | None:
    """Why a cell cannot be produced (None: it can); `unavailable` caches each dataset's reason ("" for none)."""
    if row.method not in methods:
        return NOT_IMPLEMENTED
    if row.dataset not in data.DATASETS:
        return NO_DATASET
    if why is not None:
        return why
    if row.dataset not in unavailable:
        try:
            data.spec(row.dataset, root=data_root)
            unavailable[row.dataset] = ""
        except BenchError as e:  # e.g. CelebA-Hair, whose record count (and so δ) needs its files
            unavailable[row.dataset] = str(e)
    return f"{NO_DATASET}: {unavailable[row.dataset]}" if unavailable[row.dataset] else None


def _for_method(items: Iterable[str], method: str, in_paper: set[str]) -> list[str]:
    """The `--set`/`--sweep` items for the cells of `method`: all but those scoped to another method of the paper
    (an item scoped to a method the paper lacks is kept, so that grid.plan names it as an error)."""
    out = []
    for item in items:
        key = item.partition("=")[0].strip()
        scope = "" if key.startswith("eval.") else key.rpartition(".")[0]
        if not scope or scope == method or scope not in in_paper:
            out.append(item)
    return out


def _gives(name: str, method: str, items: Iterable[str]) -> bool:
    """Whether a `--set`/`--sweep` item gives `method`'s field `name` (bare or scoped)."""
    return any(item.partition("=")[0].strip() in (name, f"{method}.{name}") for item in items)


def plan_text(plan: PaperPlan) -> str:
    """--dry-run: what would run and what cannot, one line per table cell we cannot produce."""
    lines = [f"{plan.paper.id}: {len(plan.cells)} cell(s), {len(plan.specs)} run(s) to produce them"]
    if plan.metrics:
        lines.append(f"metrics needed: {', '.join(plan.metrics)}")
    for c in plan.cells:
        if c.status is not None:
            r = c.row
            swept = "".join(f" {k}={sweep_text(v)}" for k, v in c.sweep.items())
            lines.append(f"  {c.table.name}: {r.method}{swept} {r.dataset} ε={r.epsilon:g} {r.metric}: {c.status}")
    return "\n".join(lines)


def reproduce(
    plan: PaperPlan, store: Store, r: grid.Runner | None, *, echo: Callable[[str], None],
    executor: grid.Executor | None = None,
) -> tuple[pd.DataFrame, list[RunSpec]]:  # fmt: skip
    """The comparison frame of a planned paper (see `compare`), and the cells that failed. With a runner `r`,
    first run the cells not finished yet through `executor` (a dataset that cannot be loaded leaves its cells
    "dataset not available") and score the metrics the tables need on reused runs that lack them."""
    missing_data: dict[str, str] = {}
    failed: list[RunSpec] = []
    if r is not None and plan.specs:
        outcome = grid.run_grid(r, list(plan.specs), real=False, skip_missing_data=True, executor=executor, echo=echo)
        missing_data, failed = outcome.missing_data, outcome.failed
        score_reused(r, [s for s, _ in outcome.outcomes], plan.metrics, echo=echo)
    return compare(plan, store, missing_data=missing_data), failed


def score_reused(
    r: grid.Runner, specs: Iterable[RunSpec], metrics: Iterable[str], *, echo: Callable[[str], None]
) -> None:
    """Score the metrics a table needs on finished runs that were scored with another set (reused runs)."""
    for key, missing in unscored(r.store, specs, metrics).items():
        echo(f"scoring {key} (reused run): {', '.join(missing)}")
        r.score(r.store.run_dir(key), metrics=missing)


def unscored(store: Store, specs: Iterable[RunSpec], metrics: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Finished runs (key -> metrics) that lack some of `metrics`: reused runs scored with another set."""
    out = {}
    for spec in specs:
        if not store.finished(spec.key):
            continue
        recorded = read_json(store.run_dir(spec.key) / "metrics.json").get("metrics", {})
        missing = tuple(m for m in metrics if m not in recorded)
        if missing:
            out[spec.key] = missing
    return out
