"""Published tables as data, and our numbers beside them (`bench paper ID`).

bench/reference/papers.toml describes each paper table once (methods, datasets, ε, δ, and our default
metric for each published metric); bench/reference/published_results.csv holds one row per published
cell: its protocol (one of ours, bench.metrics.protocols and the DPDM FID, or `other:<name>`), the tuned
setting it was published with where a paper published several (DPDM's "(FID)" and "(Acc)" rows), whether
its source is primary or secondary, and the exact source (repository@commit:path, table, row).

A paper's cells are its published rows (plus, per table, our extra methods beside them). A cell we can
produce becomes RunSpecs through `runner.plan` (bench.grid.paper_plan, the grid side of a paper), so its runs are the
very runs `bench run` makes with the same profile and seeds (same keys: finished runs are reused). This module
is the reporting side: the published data, the comparison and its tables; it never plans or runs. Ours is set
beside a published value only when both were computed by the same protocol; otherwise the cell says "protocol
differs (theirs X, ours Y)". A cell we cannot produce says why: method not implemented, dataset not available,
metric not implemented. Marks: § secondary source, ° our records ran a shortened protocol, ¶ published with a tuned
setting our runs do not use, ‡ test-selected, † partial guarantee; each with its footnote in every format.

A table may sweep one config field (an ablation, `sweep = { field, values }`): each of its CSV rows names its value
in `setting` as FIELD=VALUE, our cell of that row runs the method at that value (runner.plan's sweeps), and the
printed table gains a column for the field. `--sweep` turns each cell we can produce into one per swept value.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import pandas as pd

from bench.config import coerce, parse_value, value_text
from bench.errors import BenchError
from bench.grid.store import Store, read_json, write_json
from bench.metrics import METRICS, metric_protocol, published_metric, select_metrics
from bench.metrics.protocols import PROTOCOLS
from bench.report import tables
from bench.report.frame import (
    FOOTNOTES,
    NON_PRIVATE_SELECTION_MARK,
    PARTIAL_MARK,
    SHORTENED_MARK,
    SWEEP_PREFIX,
    TEST_SELECTED_MARK,
    load_frame,
    sweep_header,
    sweep_text,
)

COLUMNS = (
    "paper", "method", "setting", "dataset", "epsilon", "delta", "metric", "protocol", "source_kind", "value", "source",
)  # fmt: skip
SOURCE_KINDS = ("primary", "secondary")
OTHER = "other:"  # a protocol we do not implement: other:<name>
SECONDARY_MARK = "§"
SETTING_MARK = "¶"
PAPER_FOOTNOTES = FOOTNOTES | {
    SECONDARY_MARK: "secondary source: the published value comes from a summary of the paper, not from the "
    "paper or its code; not checked against a primary source.",
    SETTING_MARK: "published with a tuned setting (see the setting column) that our runs do not use: same "
    "protocol, another configuration of the method.",
}
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_TABLE_KEYS: dict[str, Any] = {
    "name": str,
    "caption": str,
    "methods": tuple[str, ...],
    "extra_methods": tuple[str, ...],
    "datasets": tuple[str, ...],
    "eps": tuple[float, ...],
    "delta": float,
    "metrics": dict[str, str],
    "note": str,
    "sweep": dict,
}
_REQUIRED = ("name", "caption", "methods", "datasets", "eps", "metrics")

# Cell statuses, in the words the table prints.
OK = "ok"
NOT_IMPLEMENTED = "method not implemented"
NO_DATASET = "dataset not available"
NO_METRIC = "metric not implemented"
NOT_RUN = "not run"
NOT_SCORED = "not scored (rerun with --run to score it)"
FAILED = "failed"  # followed by the run's one-line error from the index
PROTOCOL_DIFFERS = "protocol differs"
SWEEP_CONFLICT = "not run: the table sweeps {field}, which --set or --sweep also gives"


@dataclass(frozen=True, kw_only=True)
class Sweep:
    """A table's grid axis (an ablation): one of our method's Config fields and the values the paper published."""

    field: str
    values: tuple[Any, ...]


@dataclass(frozen=True, kw_only=True)
class Table:
    """One table of a paper, as described in papers.toml."""

    paper: str
    name: str
    caption: str
    methods: tuple[str, ...]
    extra_methods: tuple[str, ...] = ()  # ours, run beside the paper's rows without a published value
    datasets: tuple[str, ...]
    eps: tuple[float, ...]
    delta: float | None = None  # None: not stated; bench's default δ is used
    metrics: dict[str, str] = field(default_factory=dict)  # published name -> our default ("" = none)
    note: str = ""
    sweep: Sweep | None = None  # an ablation: each row published at one value (its setting FIELD=VALUE)


@dataclass(frozen=True, kw_only=True)
class Paper:
    id: str
    title: str
    venue: str
    tables: tuple[Table, ...]


@dataclass(frozen=True, kw_only=True)
class Published:
    """One row of published_results.csv; `value` None for an extra method's cell (no published value)."""

    paper: str
    method: str
    setting: str  # the paper's tuned setting of the method ("fid", "acc"), "" where it published one
    dataset: str
    epsilon: float
    delta: float | None
    metric: str
    protocol: str  # ours (bench.metrics.protocols, "dpdm" for FID too) or "other:<name>"
    source_kind: str  # "primary" or "secondary"
    value: float | None
    source: str
    # {field: value} of a row of a sweep table (its CSV setting "FIELD=VALUE"; `setting` is then "")
    sweep: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class Cell:
    """One cell of a paper table: what was published and what we must run to reproduce it."""

    table: Table
    row: Published
    ours: str  # our metric name, "" where we have no equivalent
    status: str | None  # None: reproducible; else why not (NOT_IMPLEMENTED, PROTOCOL_DIFFERS, ...)
    keys: tuple[str, ...] = ()  # run keys of the planned RunSpecs (one per seed)
    sweep: dict[str, Any] = field(default_factory=dict)  # swept values of our runs (the row's, and --sweep's)


@dataclass(frozen=True, kw_only=True)
class PaperPlan:
    """A paper's cells and the runs that produce them. Planned by bench.grid.paper_plan (the grid side: `specs` are its
    RunSpecs); rebuilt from the folder's record by `recorded_plan` for `bench report` (no specs: reporting never
    plans or runs)."""

    paper: Paper
    cells: tuple[Cell, ...]
    specs: tuple[Any, ...]  # bench.grid.RunSpec, unique by key, in cell order; () for a recorded plan
    metrics: tuple[str, ...]  # our metrics the cells need
    settings: dict[str, str] = field(default_factory=dict)  # run key -> the published setting its config names

    @property
    def run_keys(self) -> tuple[str, ...]:
        """The keys of the runs the cells read (their seeds' runs), in cell order."""
        return tuple(dict.fromkeys(k for c in self.cells for k in c.keys))

    def run_metrics(self) -> tuple[str, ...]:
        """Metric set for new runs: the table's, plus the profile's default set when it names one (a profile
        that scores everything, as the paper profile, would spend hours on protocols the table never shows)."""
        profile_set = self.specs[0].eval.metrics if self.specs else None
        return select_metrics(set(profile_set or ()) | set(self.metrics))


REFERENCE_DIR: Traversable = resources.files("bench").joinpath("reference")  # papers.toml + the CSV


def _reference(name: str) -> str:
    return REFERENCE_DIR.joinpath(name).read_text(encoding="utf-8")


def _table(paper: str, i: int, raw: Any) -> Table:
    where = f"papers.toml: {paper} table {i + 1}"
    if not isinstance(raw, dict):
        raise BenchError(f"{where}: expected a table, got {raw!r}")
    unknown = sorted(set(raw) - set(_TABLE_KEYS))
    if unknown:
        raise BenchError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(_TABLE_KEYS)}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise BenchError(f"{where}: missing key {missing[0]!r}")
    t = {k: coerce(v, _TABLE_KEYS[k], f"{where}: {k}") for k, v in raw.items()}
    where = f"papers.toml: {paper} table {t['name']!r}"
    for key in ("methods", "extra_methods", "datasets"):
        for name in t.get(key, ()):
            if not _NAME.match(name):
                raise BenchError(f"{where}: {key}: {name!r} is not a lowercase-kebab name")
    for published, ours in t["metrics"].items():
        if not isinstance(ours, str) or (ours and ours not in METRICS):
            raise BenchError(f"{where}: metric {published!r} maps to {ours!r}, not one of ours: {', '.join(METRICS)}")
    delta = t.get("delta")
    if delta is not None and not 0 < delta < 1:
        raise BenchError(f"{where}: delta must be in (0, 1), got {delta}")
    if bad := [e for e in t["eps"] if not (math.isfinite(e) and e > 0)]:
        raise BenchError(f"{where}: eps: expected a finite number > 0, got {bad[0]!r}")
    return Table(
        paper=paper,
        name=t["name"],
        caption=t["caption"],
        methods=t["methods"],
        extra_methods=t.get("extra_methods", ()),
        datasets=t["datasets"],
        eps=t["eps"],
        delta=delta,
        metrics=dict(t["metrics"]),
        note=t.get("note", ""),
        sweep=_sweep(t["sweep"], where) if "sweep" in t else None,
    )


def _sweep(raw: dict[str, Any], where: str) -> Sweep:
    """A table's `sweep = { field = "lambda_adv", values = [0, 1, 4] }`."""
    if set(raw) != {"field", "values"}:
        raise BenchError(f"{where}: sweep must be {{ field = NAME, values = [V1, V2, ...] }}, got {raw!r}")
    name, values = raw["field"], raw["values"]
    if not isinstance(name, str) or not name.isidentifier():
        raise BenchError(f"{where}: sweep field must be a config field name, got {name!r}")
    if not isinstance(values, list) or not values or any(isinstance(v, dict | list) for v in values):
        raise BenchError(f"{where}: sweep values must be a non-empty list of numbers, strings or booleans")
    if len(set(map(value_text, values))) < len(values):
        raise BenchError(f"{where}: sweep values must differ, got {values!r}")
    return Sweep(field=name, values=tuple(values))


def parse_papers(text: str) -> dict[str, Paper]:
    """Papers from the text of a papers.toml; BenchError naming the first problem."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BenchError(f"papers.toml: invalid TOML: {e}") from None
    if set(doc) != {"papers"} or not isinstance(doc["papers"], dict):
        raise BenchError("papers.toml: expected only [papers.ID] tables")
    papers = {}
    for pid, raw in doc["papers"].items():
        if not _NAME.match(pid):
            raise BenchError(f"papers.toml: paper id {pid!r} is not lowercase-kebab")
        unknown = sorted(set(raw) - {"title", "venue", "tables"})
        if unknown:
            raise BenchError(f"papers.toml: {pid}: unknown key {unknown[0]!r}; valid keys: title, venue, tables")
        tables = tuple(_table(pid, i, t) for i, t in enumerate(raw.get("tables", [])))
        if not tables:
            raise BenchError(f"papers.toml: {pid} describes no table")
        if len({t.name for t in tables}) != len(tables):
            raise BenchError(f"papers.toml: {pid}: two tables share a name")
        papers[pid] = Paper(
            id=pid,
            title=coerce(raw.get("title", ""), str, f"papers.toml: {pid}: title"),
            venue=coerce(raw.get("venue", ""), str, f"papers.toml: {pid}: venue"),
            tables=tables,
        )
    return papers


def load_papers() -> dict[str, Paper]:
    """The paper tables shipped with bench (bench/reference/papers.toml)."""
    return parse_papers(_reference("papers.toml"))


def get_paper(papers: dict[str, Paper], paper_id: str) -> Paper:
    """The paper `paper_id` names: its full id, or the part before a venue suffix when one paper has it
    (`dpimagebench` for dpimagebench-ccs25)."""
    if paper_id in papers:
        return papers[paper_id]
    matches = [pid for pid in papers if pid.startswith(f"{paper_id}-")]
    if len(matches) == 1:
        return papers[matches[0]]
    known = ", ".join(matches or papers)
    what = "ambiguous paper" if matches else "unknown paper"
    raise BenchError(f"{what} {paper_id!r}; {'it names' if matches else 'known'}: {known} (see `bench paper --list`)")


def table_of(papers: dict[str, Paper], row: Published) -> Table:
    """The table a published row belongs to; BenchError when none describes it."""
    if row.paper not in papers:
        raise BenchError(f"published row {row.paper}/{row.method}: paper {row.paper!r} is not in papers.toml")
    for t in papers[row.paper].tables:
        ours = row.method in t.methods and row.dataset in t.datasets and row.epsilon in t.eps
        if ours and row.metric in t.metrics and set(row.sweep) == ({t.sweep.field} if t.sweep else set()):
            return t  # a row of a sweep table names its swept value, the rows of other tables none
    sweep = "".join(f"/{k}={value_text(v)}" for k, v in row.sweep.items())
    raise BenchError(
        f"published row {row.paper}/{row.method}/{row.dataset}/ε={row.epsilon:g}/{row.metric}{sweep}: no table of "
        f"{row.paper} in papers.toml has this method, dataset, ε and metric"
        + (f" and sweeps {', '.join(row.sweep)}" if row.sweep else " without a sweep")
    )


def check_protocol(protocol: str) -> str:
    """A published row's protocol: one of ours, or other:<name> (BenchError otherwise)."""
    ours = sorted({*PROTOCOLS, metric_protocol("fid_inception") or ""} - {""})
    name = protocol.removeprefix(OTHER)
    if protocol in ours or (protocol.startswith(OTHER) and _NAME.match(name)):
        return protocol
    raise BenchError(
        f"protocol {protocol!r} is neither one of ours ({', '.join(ours)}) nor other:<lowercase-kebab name>"
    )


def parse_published(text: str, papers: dict[str, Paper], where: str = "published_results.csv") -> list[Published]:
    """Rows of a published-results CSV, checked against the paper tables; BenchError naming the first problem."""
    reader = csv.DictReader(text.splitlines())
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise BenchError(f"{where}: columns must be {','.join(COLUMNS)}, got {','.join(reader.fieldnames or [])}")
    rows, seen = [], set()
    for line, raw in enumerate(reader, start=2):
        at = f"{where} line {line}"
        if None in raw or any(v is None for v in raw.values()):
            raise BenchError(f"{at}: expected {len(COLUMNS)} fields")
        try:
            eps = float(raw["epsilon"])
            delta = float(raw["delta"]) if raw["delta"].strip() else None
            value = float(raw["value"])
        except ValueError as e:
            raise BenchError(f"{at}: {e}") from None
        if not (math.isfinite(eps) and eps > 0):
            raise BenchError(f"{at}: epsilon must be a finite number > 0, got {raw['epsilon']}")
        if delta is not None and not 0 < delta < 1:
            raise BenchError(f"{at}: delta must be in (0, 1) or empty, got {raw['delta']}")
        if not math.isfinite(value):
            raise BenchError(f"{at}: value must be a finite number, got {raw['value']}")
        if not raw["source"].strip():
            raise BenchError(f"{at}: source is empty (say where the number comes from)")
        if raw["source_kind"].strip() not in SOURCE_KINDS:
            raise BenchError(f"{at}: source_kind must be one of {', '.join(SOURCE_KINDS)}, got {raw['source_kind']!r}")
        row = Published(
            paper=raw["paper"].strip(),
            method=raw["method"].strip(),
            dataset=raw["dataset"].strip(),
            epsilon=eps,
            delta=delta,
            metric=raw["metric"].strip(),
            protocol=raw["protocol"].strip(),
            source_kind=raw["source_kind"].strip(),
            value=value,
            source=raw["source"].strip(),
            **_setting_sweep(raw["setting"]),
        )
        try:
            check_protocol(row.protocol)
            table = table_of(papers, row)
        except BenchError as e:
            raise BenchError(f"{at}: {e}") from None
        if table.delta is not None and delta is not None and delta != table.delta:
            raise BenchError(f"{at}: δ = {delta:g}, but table {row.paper}/{table.name} has δ = {table.delta:g}")
        if table.sweep and (v := row.sweep[table.sweep.field]) not in table.sweep.values:
            raise BenchError(
                f"{at}: {table.sweep.field}={value_text(v)} is not a value table {row.paper}/{table.name} sweeps "
                f"({', '.join(map(value_text, table.sweep.values))})"
            )
        ident = (row.paper, row.method, row.setting, row.dataset, row.epsilon, row.metric, row.protocol,
                 *row.sweep.items())  # fmt: skip
        if ident in seen:
            raise BenchError(f"{at}: duplicate of an earlier row ({', '.join(map(str, ident))})")
        seen.add(ident)
        rows.append(row)
    return rows


def _setting_sweep(setting: str) -> dict[str, Any]:
    """The `setting` of a CSV row as Published fields: "FIELD=VALUE" (a row of a sweep table) is its sweep, the
    value parsed as a `--set` value; any other text is a tuned setting."""
    name, sep, text = setting.partition("=")
    if not sep:
        return {"setting": setting.strip()}
    return {"setting": "", "sweep": {name.strip(): parse_value(text.strip())}}


def load_published(papers: dict[str, Paper]) -> list[Published]:
    """The published cells shipped with bench (bench/reference/published_results.csv)."""
    return parse_published(_reference("published_results.csv"), papers)


def list_text(papers: dict[str, Paper], published: list[Published]) -> str:
    """`bench paper --list`: one block per paper, one line per table."""
    lines = []
    width = max([10, *(len(t.name) for p in papers.values() for t in p.tables)])
    for p in papers.values():
        lines.append(f"{p.id}  {p.title} ({p.venue})")
        for t in p.tables:
            n = sum(table_of(papers, r) is t for r in published if r.paper == p.id)
            eps = ", ".join(f"{e:g}" for e in t.eps)
            sweep = f"; {t.sweep.field} ∈ {{{', '.join(map(value_text, t.sweep.values))}}}" if t.sweep else ""
            lines.append(f"  {t.name:<{width}} {t.caption}")
            lines.append(
                f"  {'':<{width}} methods {', '.join(t.methods)}; datasets {', '.join(t.datasets)}; ε {eps}{sweep}; "
                f"{n} published cell(s)"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------


def paper_cells(paper: Paper, papers: dict[str, Paper], published: list[Published]) -> list[tuple[Table, Published]]:
    """The paper's published rows, then per table one valueless row per extra method and published column (and
    swept value); a sweep table's rows ordered by swept value, ours beside the published row of each."""
    out = []
    for t in paper.tables:
        rows = [r for r in published if r.paper == paper.id and table_of(papers, r) is t]
        cells = [(t, r) for r in rows]
        columns = dict.fromkeys((r.dataset, r.epsilon, r.metric, tuple(r.sweep.items())) for r in rows)
        for method in t.extra_methods:
            for ds, eps, metric, sweep in columns:
                extra = Published(
                    paper=paper.id,
                    method=method,
                    setting="",
                    dataset=ds,
                    epsilon=eps,
                    delta=t.delta,
                    metric=metric,
                    protocol=metric_protocol(t.metrics[metric]) or "",  # ours: the protocol of our default metric
                    source_kind="",
                    value=None,
                    source="",
                    sweep=dict(sweep),
                )
                cells.append((t, extra))
        if (axis := t.sweep) is not None:
            at = {k: i for i, k in enumerate(dict.fromkeys((r.dataset, r.epsilon) for _, r in cells))}
            cells.sort(key=lambda c: (at[c[1].dataset, c[1].epsilon], axis.values.index(c[1].sweep[axis.field])))
        out += cells
    return out


def our_metric(table: Table, row: Published) -> tuple[str, str | None]:
    """Our metric for a cell and, when we cannot set it beside the published value, why not."""
    default = table.metrics[row.metric]
    if row.protocol.startswith(OTHER):
        if not default:
            return "", NO_METRIC
        ours = metric_protocol(default) or f"bench's {default}"
        return default, f"{PROTOCOL_DIFFERS} (theirs {row.protocol}, ours {ours})"
    if row.protocol in ("", metric_protocol(default)) and default:
        return default, None
    mapped = published_metric(row.metric, row.protocol)
    return (mapped, None) if mapped else ("", f"{NO_METRIC} (protocol {row.protocol} has no {row.metric})")


# ---------------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------------


def _note(info: Any) -> str:
    try:
        return str(json.loads(info).get("note") or "") if isinstance(info, str) else ""
    except json.JSONDecodeError:
        return ""


def compare(plan: PaperPlan, store: Store | None, *, missing_data: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per cell: published value, ours (mean, std, n over generator × classifier seeds, as the
    report pools them), ours − published, status, and the marks of both sides.

    Ours is set beside the published value only when our records ran the row's protocol. `missing_data`
    maps a dataset that failed to load to the reason (its cells: dataset not available). A plan with runs
    to report needs a `store` with runs in it (BenchError otherwise).
    """
    missing_data = missing_data or {}
    frame, run_status, run_error = pd.DataFrame(), {}, {}
    if plan.run_keys:
        if store is None:
            raise BenchError("no results folder given")
        runs, _ = store.rows()
        if not runs:
            raise BenchError(f"no runs in {store.root}: run `bench paper {plan.paper.id} --run` first")
        run_status = {r["key"]: r["status"] for r in runs}
        run_error = {r["key"]: r.get("error") for r in runs}
        if "done" in run_status.values():
            frame = load_frame(store)
            frame = frame[frame["key"].isin(set(plan.run_keys))]
    swept = list(dict.fromkeys(k for c in plan.cells for k in c.sweep))  # a column each, after the method's
    rows = []
    for c in plan.cells:
        r = c.row
        status, mean, std, n, partial = c.status, math.nan, math.nan, 0, False
        ours_protocol, shortened, setting_differs = metric_protocol(c.ours) if c.ours else None, {}, False
        selected = bool(r.protocol in PROTOCOLS and PROTOCOLS[r.protocol].test_selected)
        non_private = False  # a record says it selected on real validation records without noise (dpimagebench)
        if status is None and r.dataset in missing_data:
            status = f"{NO_DATASET}: {missing_data[r.dataset]}"
        if status is None:
            done = [k for k in c.keys if run_status.get(k) == "done"]
            if not done:
                errors = [run_error.get(k) or "" for k in c.keys if run_status.get(k) == "failed"]
                status = f"{FAILED} ({errors[0]})" if errors else NOT_RUN
            else:
                mine = frame[frame["key"].isin(done) & (frame["metric"] == c.ours)]
                partial = bool((frame[frame["key"].isin(done)]["guarantee"] == "partial").any())
                infos = [json.loads(i) for i in mine["info"] if isinstance(i, str)]
                selected = selected or any(i.get("test_selected", False) for i in infos)
                non_private = any(i.get("non_private_selection", False) for i in infos)
                ran = {i["protocol"] for i in infos if i.get("protocol")}
                shortened = {k: v for i in infos for k, v in (i.get("shortened") or {}).items()}
                ours_setting = {plan.settings.get(k, "") for k in done}
                setting_differs = bool(r.setting) and ours_setting != {r.setting}
                pooled_mean, pooled_std, pooled_n = tables.stats(mine["values"])
                if mine.empty:
                    status = NOT_SCORED
                elif r.protocol and ran and ran != {r.protocol}:
                    status = f"{PROTOCOL_DIFFERS} (theirs {r.protocol}, ours {', '.join(sorted(ran))})"
                elif not pooled_n:
                    status = next((n for n in map(_note, mine["info"]) if n), "n/a")
                else:
                    mean, std, n = pooled_mean, pooled_std, pooled_n
                    status = OK if len(done) == len(c.keys) else f"{OK} ({len(done)} of {len(c.keys)} seeds finished)"
        rows.append(
            {
                "table": c.table.name,
                "dataset": r.dataset,
                "epsilon": r.epsilon,
                "method": r.method + (PARTIAL_MARK if partial else ""),
                **{SWEEP_PREFIX + k: sweep_text(c.sweep[k]) if k in c.sweep else "" for k in swept},
                "setting": r.setting,
                "metric": r.metric,
                "protocol": r.protocol,
                "ours_metric": (
                    c.ours
                    + (TEST_SELECTED_MARK if selected else "")
                    + (NON_PRIVATE_SELECTION_MARK if non_private else "")
                )
                if c.ours
                else "",
                "ours_protocol": ours_protocol or "",
                "published": math.nan if r.value is None else r.value,
                "ours_mean": mean,
                "ours_std": std,
                "n": n,
                "diff": mean - r.value if r.value is not None and n else math.nan,
                "status": status,
                "shortened": "; ".join(f"{k} {a}→{b}" for k, (a, b) in shortened.items()) if n else "",
                "marks": "".join(
                    mark
                    for mark, on in (
                        (SECONDARY_MARK, r.source_kind == "secondary"),
                        (SHORTENED_MARK, bool(shortened) and n > 0),
                        (SETTING_MARK, setting_differs and n > 0),
                        (TEST_SELECTED_MARK, selected and n > 0),
                        (NON_PRIVATE_SELECTION_MARK, non_private and n > 0),
                        (PARTIAL_MARK, partial),
                    )
                    if on
                ),  # fmt: skip
                "source_kind": r.source_kind,
                "source": r.source,
            }
        )
    return pd.DataFrame(rows)


SETTING_KEYS = ("sampler_preset", "adjacency")  # config fields whose value names a published setting


def config_setting(config: dict[str, Any]) -> str:
    """The published setting a run's config reproduces ("" when it names none)."""
    return next((str(config[k]) for k in SETTING_KEYS if config.get(k)), "")


def _ours(row: pd.Series) -> str:
    if not row["n"]:
        return "—"
    marks = "".join(m for m in (SHORTENED_MARK, SETTING_MARK) if m in row["marks"])
    return tables.cell_text(row["ours_mean"], row["ours_std"], row["n"], marks)


def _published(row: pd.Series) -> str:
    if math.isnan(row["published"]):
        return "—"
    return f"{row['published']:g}" + (SECONDARY_MARK if SECONDARY_MARK in row["marks"] else "")


def _status_note(row: pd.Series) -> str:
    notes = []
    if row["status"] == OK:
        if math.isnan(row["published"]):
            notes.append("ours only (no published value)")
    else:
        notes.append(str(row["status"]))
    if row["shortened"]:
        notes.append(f"shortened: {row['shortened']}")
    return "; ".join(notes)


# a sweep table adds one column per swept field after "method"
HEADER = ["dataset", "ε", "method", "setting", "metric", "protocol", "published", "ours", "ours − published", "note",
          "src"]  # fmt: skip


@dataclass(frozen=True)
class Shown:
    """One paper table as printed: its heading, the cells (HEADER columns) and the lines under it."""

    table: Table
    heading: str
    cells: pd.DataFrame
    notes: list[str]


def shown_tables(plan: PaperPlan, frame: pd.DataFrame) -> list[Shown]:
    """Per paper table with cells: published, ours, ours − published, why a cell is missing, its sources and the
    footnotes of its marks."""
    out = []
    for t in plan.paper.tables:
        sub = frame[frame["table"] == t.name]
        if sub.empty:
            continue
        sources = list(dict.fromkeys(s for s in sub["source"] if s))
        swept = [c for c in sub.columns if c.startswith(SWEEP_PREFIX) and sub[c].astype(bool).any()]
        body = []
        for _, row in sub.iterrows():
            metric = f"{row['metric']} → {row['ours_metric']}" if row["ours_metric"] else row["metric"]
            body.append(
                [
                    row["dataset"],
                    f"{row['epsilon']:g}",
                    row["method"],
                    *(row[c] or "—" for c in swept),
                    row["setting"] or "—",
                    metric,
                    row["protocol"] or "—",
                    _published(row),
                    _ours(row),
                    "—" if math.isnan(row["diff"]) else f"{row['diff']:+.2f}",
                    _status_note(row),
                    str(sources.index(row["source"]) + 1) if row["source"] else "",
                ]
            )
        delta = f"δ = {t.delta:g}" if t.delta is not None else "δ: bench's default"
        notes = [f"[{i}] {s}" for i, s in enumerate(sources, start=1)] + footnotes(sub)
        notes += [f"note: {t.note}"] if t.note else []
        header = [*HEADER[:3], *map(sweep_header, swept), *HEADER[3:]]
        out.append(Shown(t, f"{t.name}: {t.caption} ({delta})", pd.DataFrame(body, columns=header), notes))
    return out


def title(plan: PaperPlan) -> str:
    return f"{plan.paper.id}: {plan.paper.title} ({plan.paper.venue})"


def to_markdown(plan: PaperPlan, frame: pd.DataFrame) -> str:
    """One Markdown table per paper table: published, ours, ours − published, and why a cell is missing."""
    out = [f"# {title(plan)}"]
    for shown in shown_tables(plan, frame):
        out += ["", f"## {shown.heading}", "", tables.markdown(shown.cells), "", *shown.notes]
    return "\n".join(out)


def write_tables(plan: PaperPlan, frame: pd.DataFrame, out: Path, formats: Iterable[str]) -> list[Path]:
    """out/paper-ID.md (as printed), .csv (one row per cell, every column of `compare`) and .tex (one booktabs
    table per paper table), as `formats` asks; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    stem, paths = out / f"paper-{plan.paper.id}", []
    if "md" in formats:
        (path := stem.with_suffix(".md")).write_text(to_markdown(plan, frame) + "\n")
        paths.append(path)
    if "csv" in formats:
        frame.to_csv(path := stem.with_suffix(".csv"), index=False)
        paths.append(path)
    if "tex" in formats:
        shown = shown_tables(plan, frame)
        latex = [tables.to_latex(s.cells, index=False, caption=f"{title(plan)}: {s.heading}", notes=s.notes)
                 for s in shown]  # fmt: skip
        (path := stem.with_suffix(".tex")).write_text("\n".join(latex))
        paths.append(path)
    return paths


def footnotes(frame: pd.DataFrame) -> list[str]:
    """The footnote of every mark the cells of `frame` carry."""
    return tables.footnotes([*frame["marks"], *frame["method"], *frame["ours_metric"]], PAPER_FOOTNOTES)


# ---------------------------------------------------------------------------------------------------
# Which papers ran on a results folder (for `bench report`'s HTML page)
# ---------------------------------------------------------------------------------------------------

RECORD_OPTIONS = ("profile", "seeds", "accountant", "sets", "sweeps", "plugins", "data_root")


def _records_dir(store: Store) -> Path:
    return store.root / "papers"


def record_run(store: Store, plan: PaperPlan, **options: Any) -> Path:
    """results/papers/<ID>.json: the options `bench paper ID` planned with and the plan itself (its cells, their
    run keys, the setting each run's config names), so that `bench report` can compare the paper's table with the
    folder's runs again without planning (the latest call wins)."""
    unknown = sorted(set(options) - set(RECORD_OPTIONS))
    if unknown:
        raise ValueError(f"unknown paper record option {unknown[0]!r}")
    path = _records_dir(store) / f"{plan.paper.id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    cells = [{"table": [c.table.paper, c.table.name], "row": dataclasses.asdict(c.row), "ours": c.ours,
              "status": c.status, "keys": list(c.keys), "sweep": c.sweep} for c in plan.cells]  # fmt: skip
    write_json(path, {"paper": plan.paper.id, **options, "plan": {"cells": cells, "metrics": list(plan.metrics),
                                                                  "settings": plan.settings}})  # fmt: skip
    return path


def recorded_runs(store: Store) -> list[dict[str, Any]]:
    """The records of every `bench paper ID` that ran on this folder, by paper id."""
    folder = _records_dir(store)
    return [read_json(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def recorded_plan(record: dict[str, Any]) -> PaperPlan:
    """The plan a record holds (BenchError when the record predates recorded plans, or names a table that
    papers.toml no longer has)."""
    paper_id = str(record.get("paper", "?"))
    if "plan" not in record:
        raise BenchError(f"paper record {paper_id!r} holds no plan (an older bench wrote it): run `bench paper "
                         f"{paper_id}` again")  # fmt: skip
    known = load_papers()
    try:
        paper = get_paper(known, paper_id)
        tables_by = {(t.paper, t.name): t for p in known.values() for t in p.tables}
        cells = tuple(
            Cell(table=tables_by[tuple(c["table"])], row=Published(**c["row"]), ours=c["ours"], status=c["status"],
                 keys=tuple(c["keys"]), sweep=dict(c["sweep"]))
            for c in record["plan"]["cells"]
        )  # fmt: skip
        return PaperPlan(paper=paper, cells=cells, specs=(), metrics=tuple(record["plan"]["metrics"]),
                         settings=dict(record["plan"]["settings"]))  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise BenchError(f"paper record {paper_id!r} cannot be read ({e!r})") from None
