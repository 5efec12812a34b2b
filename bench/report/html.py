"""The HTML report (`bench report --format html`): OUT/index.html, one page a researcher opens in a browser.

The page is built with Jinja2 (bench/report/templates/report.html.j2, autoescaped) from the very DataFrames that
bench.report writes as Markdown, CSV and LaTeX (summary, one table per metric, cost), bench.audit's audit
table and bench.report.paper's shown tables, so every number on the page is the text of the CSV beside it. It is
self-contained and works offline: its CSS and JS are inline, no request leaves the file system, and its
figures are bench.report.plots' PNG files beside it (OUT/plots/). A run's key links to its folder by a relative
path, so the page keeps working when the results folder and the reports folder are copied together.

On the page: the summary table (each column sortable, a filter box, the marks' footnotes) with each row's
runs folded under it (key, links to config.json, log.txt, samples.png, and the privacy card: accountant, δ,
ε recomputed and claimed, each stage's mechanism, σ, q, steps, C, the non-private parts); one table per
metric (best cell bold) beside its metric-vs-ε and cost-vs-quality plots; the sample grids per (dataset,
ε); the cost table; the audit table; and each paper that `bench paper ID` ran on this folder, its
published-vs-ours table with the differences coloured by their relative size.

Sorting (numbers by value, words by text, empty cells last), folding and filtering are a few lines of JS over
one <tbody> per row, so a row and its folded card move together. 1,000 runs render in about 2 s on 2 cores
(benchmarks/bench_report.py) and their page sorts 1,000 rows in about 50 ms (tests/test_html.py).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata, resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from bench.grid.store import Store, read_json
from bench.report import tables
from bench.report.frame import REAL_LABEL, sweep_columns, sweep_header

TEMPLATES = resources.files("bench.report").joinpath("templates")
RUN_FILES = ("config.json", "privacy.json", "metrics.json", "log.txt", "samples.png", "curve.json")  # when present
CLOSE, NEAR = 0.05, 0.20  # |ours − published| / |published|: green up to 5%, amber up to 20%, red above
_NUMBER = re.compile(r"^[-+−]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass(frozen=True)
class Cell:
    text: str
    sort: str = ""  # the number the column sorts by ("" when the cell has none: sorted as text, after numbers)
    bold: bool = False
    cls: str = ""
    href: str = ""  # the cell's text links there
    title: str = ""

    @property
    def classes(self) -> str:
        return " ".join(c for c in ("num" if self.sort else "", "best" if self.bold else "", self.cls) if c)


@dataclass(frozen=True)
class RunCard:
    """One run folded under its summary row: its folder, files and privacy card."""

    key: str
    href: str
    seed: str
    files: list[tuple[str, str]]  # (name, href)
    facts: list[tuple[str, str]]  # (label, value)
    stages: list[dict[str, str]] = field(default_factory=list)
    non_private: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Row:
    cells: list[Cell]
    cards: list[RunCard] = field(default_factory=list)


@dataclass(frozen=True)
class Table:
    id: str
    caption: str
    columns: list[str]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    csv: str = ""  # the CSV file beside the page with the same cells ("" when none was written)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (src, alt) shown beside the table


@dataclass(frozen=True)
class PaperSection:
    title: str
    tables: list[Table] = field(default_factory=list)
    error: str = ""


def sort_key(text: str) -> str:
    """The number a cell sorts by: its leading number ("0.89 ± 0.01 (n=3)" -> 0.89), ∞ as Infinity, else ""."""
    text = text.strip()
    if text.startswith("∞"):
        return "Infinity"
    m = _NUMBER.match(text)
    return m.group(0).replace("−", "-") if m else ""


def cell(value: Any, **kw: Any) -> Cell:
    text = "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)
    return Cell(text, sort_key(text), **kw)


def href(path: Path, base: Path) -> str:
    """A relative URL from the folder `base` to `path` (an absolute file: URL where no relative path exists)."""
    try:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(base))
    except ValueError:  # another drive (Windows)
        return path.absolute().as_uri()
    return quote(Path(rel).as_posix()) + ("/" if path.is_dir() else "")


def frame_table(
    df: pd.DataFrame, *, id: str, caption: str, notes: Iterable[str] = (), csv: str = "", index: bool = False,
    bold: set[tuple[Any, str]] | None = None,
) -> Table:  # fmt: skip
    """A table of the page from a DataFrame as bench.report.tables writes it (`index`: the index is the first column, or
    the first columns for a MultiIndex; a bold cell names its row as tables.row_label does)."""
    t = df.reset_index() if index else df
    levels = df.index.nlevels if index else 1
    bold = bold or set()
    rows = []
    for values in t.itertuples(index=False):
        first = tables.row_label(values, levels)
        rows.append(Row([cell(v, bold=(first, str(c)) in bold) for c, v in zip(t.columns, values, strict=True)]))
    return Table(id=id, caption=caption, columns=[str(c) for c in t.columns], rows=rows, notes=list(notes), csv=csv)


# ---------------------------------------------------------------------------------------------------
# Run cards
# ---------------------------------------------------------------------------------------------------


def _stage(stage: dict[str, Any]) -> dict[str, str]:
    """A stage of a privacy card, its numbers as bench.report's privacy table prints them."""
    n = tables.stage_numbers(stage)
    batch = stage.get("expected_batch_size")
    return {
        "stage": str(stage["name"]),
        "mechanism": str(stage["mechanism"]),
        "noise": next(f"{k}={n[k]}" for k in ("σ", "b") if k in n),
        "q": n.get("q", "—"),
        "steps": n.get("steps", n.get("count", "—")),
        "C": n.get("C", "—"),
        "batch": "—" if batch is None else f"{batch:g}",
    }


def run_card(store: Store, run: dict[str, Any], base: Path) -> RunCard:
    """The card of one finished run (a row of the results frame): links to its folder and files, its privacy card
    and its cost."""
    folder = store.run_dir(run["key"])
    folder_href = href(folder, base)
    files = [(name, folder_href + quote(name)) for name in RUN_FILES if (folder / name).is_file()]
    card_path = folder / "privacy.json"
    card = read_json(card_path) if card_path.is_file() else {}
    cost = json.loads(run["cost"]) if isinstance(run.get("cost"), str) else {}
    facts = []
    if run["method"] == "real":
        facts.append(("privacy", "none: the real-data reference (no generator)"))
    elif card:
        claimed = card.get("claimed_epsilon")
        facts += [
            ("ε target", "∞" if card.get("target_epsilon") is None else f"{card['target_epsilon']:g}"),
            ("ε recomputed", "∞" if card.get("epsilon") is None else f"{card['epsilon']:.3f}"),
            ("ε claimed", "—" if claimed is None else f"{claimed:.3f}"),
            ("δ", f"{card.get('delta', math.nan):g}"),
            ("accountant", str(card.get("accountant", "?"))),
            ("guarantee", str(card.get("guarantee", "?"))),
        ]
    else:
        facts.append(("privacy card", "missing (no privacy.json)"))
    seconds = [f"{k.removesuffix('_s')} {cost[k]:.1f} s" for k in ("fit_s", "sample_s", "score_s") if k in cost]
    if seconds:
        facts.append(("cost", ", ".join(seconds) + f" on {cost.get('device', '?')}"))
    return RunCard(
        key=str(run["key"]), href=folder_href, seed=str(run["seed"]), files=files, facts=facts,
        stages=[_stage(s) for s in card.get("stages", [])], non_private=list(card.get("non_private", [])),
        assumptions=list(card.get("assumptions", [])),
    )  # fmt: skip


def summary_rows(store: Store, df: pd.DataFrame, table: pd.DataFrame, notes: list[str], base: Path, csv: str) -> Table:
    """The summary table, each row with the cards of the runs behind it (by seed)."""
    swept = sweep_columns(df)
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for run in df.drop_duplicates("key").sort_values("seed").to_dict("records"):
        groups.setdefault(tuple(run[c] for c in ["label", *swept, "dataset", "eps"]), []).append(run)
    page = frame_table(table, id="summary", caption="Summary", notes=notes, csv=csv)
    heads = ["method", *map(sweep_header, swept), "dataset", "ε target"]
    rows = []
    for row, raw in zip(page.rows, table[heads].itertuples(index=False), strict=True):
        runs = groups.get(tuple(raw), [])
        rows.append(Row(row.cells, [run_card(store, r, base) for r in runs]))
    return replace(page, rows=rows)


# ---------------------------------------------------------------------------------------------------
# Paper tables
# ---------------------------------------------------------------------------------------------------


def diff_cell(text: str, row: pd.Series) -> Cell:
    """ "ours − published", coloured by its size relative to the published value, with a tooltip saying which
    way is better."""
    diff, published = row["diff"], row["published"]
    if math.isnan(diff) or math.isnan(published):
        return cell(text)
    rel = abs(diff) / abs(published) if published else math.inf
    cls = "diff-close" if rel <= CLOSE else "diff-near" if rel <= NEAR else "diff-far"
    metric = str(row["ours_metric"] or row["metric"])
    better = (diff < 0) == tables.lower_is_better(metric) if diff else None
    way = "equal" if better is None else "better" if better else "worse"
    return cell(text, cls=cls, title=f"{rel:.1%} of the published value; ours is {way} ({metric})")


def paper_tables(shown: list[Any], frame: pd.DataFrame, csv: str, prefix: str) -> list[Table]:
    """bench.report.paper's shown tables as tables of the page, the difference column coloured."""
    out = []
    for i, s in enumerate(shown):
        sub = frame[frame["table"] == s.table.name]
        diff_at = list(s.cells.columns).index("ours − published")
        rows = []
        for values, (_, raw) in zip(s.cells.itertuples(index=False), sub.iterrows(), strict=True):
            cells = [cell(v) for v in values]
            cells[diff_at] = diff_cell(str(values[diff_at]), raw)
            rows.append(Row(cells))
        out.append(Table(id=f"{prefix}-{i}", caption=s.heading, columns=list(s.cells.columns), rows=rows,
                         notes=s.notes, csv=csv))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------


def _env() -> Environment:
    return Environment(
        loader=PackageLoader("bench.report", "templates"),
        autoescape=select_autoescape(["html", "j2"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _version() -> str:
    try:
        return metadata.version("bench-dp-gen")
    except metadata.PackageNotFoundError:
        return "?"


def figures(plots: Iterable[Path], base: Path, prefix: str) -> list[tuple[str, str]]:
    """(src, alt) of the PNG plots whose file name starts with `prefix`."""
    found = sorted(p for p in plots if p.suffix == ".png" and p.name.startswith(prefix))
    return [(href(p, base), p.stem.replace("_", " ")) for p in found]


def audit_rows(store: Store, audits: pd.DataFrame, base: Path) -> Table:
    """bench.audit's table (indexed by the audit cells' keys), each row's method linking to its audit's folder."""
    page = frame_table(audits, id="audits", caption="Privacy audits (95% lower bounds)", csv=_csv(base, "audit"))
    rows = [Row([replace(row.cells[0], href=href(store.run_dir(str(key)), base)), *row.cells[1:]])
            for row, key in zip(page.rows, audits.index, strict=True)]  # fmt: skip
    return replace(page, rows=rows)


def _csv(out: Path, stem: str) -> str:
    return f"{stem}.csv" if (out / f"{stem}.csv").is_file() else ""


def build_page(
    out: Path, *, store: Store, df: pd.DataFrame, summary: pd.DataFrame, notes: list[str],
    per_metric: list[tuple[str, str, pd.DataFrame, set[tuple[Any, str]]]], cost: pd.DataFrame,
    audits: pd.DataFrame | None, papers: list[tuple[str, Any, pd.DataFrame | None, str]], plots: list[Path] | None,
    files: list[Path], curves_csv: str = "",
) -> Path:  # fmt: skip
    """OUT/index.html from bench.report's tables: `per_metric` is (label, name, table, best cells) per metric,
    `papers` (id, plan, comparison frame, error) per paper record, `plots` the files bench.report.plots wrote (None:
    none were), `files` every file the report wrote (listed at the end), `curves_csv` the CSV of the
    quality-against-compute points beside the page ("" when no run has a curve); returns the page's path."""
    from bench.report import paper

    metric_tables = []
    for label, name, table, bold in per_metric:
        t = frame_table(table, id=f"metric-{name}", caption=label, csv=_csv(out, name), index=True, bold=bold)
        shown = figures(plots or [], out, f"metric_vs_eps_{name}.") + figures(plots or [], out, f"cost_{name}.")
        metric_tables.append(replace(t, figures=shown))
    sections = []
    for paper_id, plan, frame, error in papers:
        if plan is None or frame is None:
            sections.append(PaperSection(title=f"Paper {paper_id}", error=error))
            continue
        stem = f"paper-{plan.paper.id}"
        shown_tables = paper_tables(paper.shown_tables(plan, frame), frame, _csv(out, stem), stem)
        sections.append(PaperSection(title=paper.title(plan), tables=shown_tables))
    return write_page(
        out, store=store, df=df,
        summary_table=summary_rows(store, df, summary, notes, out, _csv(out, "summary")),
        metric_tables=metric_tables,
        cost=frame_table(cost, id="cost", caption="Cost per run", csv=_csv(out, "cost")),
        audits=None if audits is None else audit_rows(store, audits, out),
        papers=sections, plots=plots, files=files, notes=notes, curves_csv=curves_csv,
    )  # fmt: skip


def write_page(
    out: Path, *, store: Store, df: pd.DataFrame, summary_table: Table, metric_tables: list[Table],
    cost: Table | None, audits: Table | None, papers: list[PaperSection], plots: list[Path] | None,
    files: list[Path], notes: list[str], curves_csv: str = "",
) -> Path:  # fmt: skip
    """Render OUT/index.html; returns its path. `notes`: the footnotes of the marks, shown once above the metric
    tables (the summary table carries them too). `curves_csv`: the quality-against-compute points' CSV beside
    the page; with it, a section shows their figures (bench.report.plots' curve_* files) and links it."""
    page = out / "index.html"
    samples = figures(plots or [], out, "samples_")
    curves = {"csv": curves_csv, "figures": figures(plots or [], out, "curve_")} if curves_csv else None
    runs = df.drop_duplicates("key")
    html = (
        _env()
        .get_template("report.html.j2")
        .render(
            title=f"bench report: {store.root.resolve().name}",
            results=str(store.root.resolve()),
            results_href=href(store.root, out),
            generated=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            version=_version(),
            counts={
                "runs": int((runs["method"] != "real").sum()),
                "methods": sorted(set(runs.loc[runs["label"] != REAL_LABEL, "label"])),
                "datasets": sorted(set(runs["dataset"])),
            },
            summary=summary_table,
            metric_tables=metric_tables,
            metric_notes=notes,
            samples=samples,
            cost=cost,
            audits=audits,
            papers=papers,
            curves=curves,
            plots=plots is not None,
            files=[(p.name, href(p, out)) for p in files],
            css=Markup(TEMPLATES.joinpath("report.css").read_text(encoding="utf-8")),
            js=Markup(TEMPLATES.joinpath("report.js").read_text(encoding="utf-8")),
        )
    )
    page.write_text(html, encoding="utf-8")
    return page
