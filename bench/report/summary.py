"""Tables from the results frame (bench.report.frame): method × (dataset, ε), mean ± std over seeds, with the checked ε.

The ε column is the harness's recomputation from each run's ledger (never the method's claim); a row
whose guarantee is partial carries a mark and a footnote; the non-private reference shows ε = ∞; each
dataset's real-data row (method "real", shown as "real data") gives the same metrics on real data.
A metric cell pools every value behind it: generator seeds × classifier seeds (`per_seed` of an
accuracy record), so "(n=6)" is 3 generator seeds × 2 classifier seeds.

Outputs (`write_report`): summary, one table per metric, a privacy table (accountant, δ, ε, σ, q, steps
per stage) and a cost table, each as Markdown, CSV and/or LaTeX (booktabs, best cell per column bold).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import BenchError
from bench.grid.store import Store, read_json
from bench.report import tables
from bench.report.frame import (
    NON_PRIVATE_SELECTION_MARK,
    REAL_LABEL,
    SHORTENED_MARK,
    TEST_SELECTED_MARK,
    eps_order,
    info_of,
    load_frame,
    metric_label_of,
    sweep_columns,
    sweep_header,
    sweep_order,
)
from bench.report.plots import lines, write_curve_plots, write_plots


def _costs(runs: pd.DataFrame) -> list[dict[str, Any]]:
    """The cost records of `runs` (JSON text in the index), parsed."""
    return [json.loads(c) for c in runs.get("cost", pd.Series(dtype=object)).dropna()]


def _fmt_cost(costs: list[dict[str, Any]], key: str, digits: int = 0) -> str:
    values = [float(v) for v in (c.get(key) for c in costs) if isinstance(v, int | float)]
    return f"{sum(values) / len(values):.{digits}f}" if values else "n/a"


def _sorted(rows: list[dict[str, Any]], swept: list[str]) -> pd.DataFrame:
    """The rows by dataset, ε (the real-data row last), method and the swept values (`swept`: their columns)."""
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["_e"] = out["ε target"].map(eps_order)
    out["_r"] = out["method"] == REAL_LABEL  # the real-data row last within its dataset
    ranks = {f"_s{i}": _rank(out[name]) for i, name in enumerate(swept)}
    out = out.assign(**ranks).sort_values(["dataset", "_r", "_e", "method", *ranks])
    return out.drop(columns=["_e", "_r", *ranks]).reset_index(drop=True)


def _rank(values: pd.Series) -> pd.Series:
    """Each swept value's place in sweep_order (numbers by value, not as text)."""
    return values.map({v: i for i, v in enumerate(sorted(set(values), key=sweep_order))})


def _keys(df: pd.DataFrame) -> list[str]:
    """The frame columns that make a table row: method, the swept fields (if any), dataset, ε."""
    return ["label", *sweep_columns(df), "dataset", "eps"]


def _heads(df: pd.DataFrame) -> list[str]:
    """The table columns of `_keys`."""
    return ["method", *map(sweep_header, sweep_columns(df)), "dataset", "ε target"]


def _groups(df: pd.DataFrame) -> Iterable[tuple[dict[str, str], pd.DataFrame]]:
    """The first columns of each row (method, the swept values, dataset, ε target) and its runs, one row per run."""
    for group, runs in df.drop_duplicates("key").groupby(_keys(df), sort=False):
        yield dict(zip(_heads(df), group, strict=True)), runs


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, swept values, dataset, ε): the recomputed ε, δ, accountant, guarantee and every
    metric."""
    cells: dict[tuple[str, ...], dict[str, str]] = {}
    scored = df.dropna(subset=["metric_label"])
    for (*group, metric), m in scored.groupby([*_keys(df), "metric_label"], sort=True):
        cells.setdefault(tuple(group), {})[metric] = tables.mean_std(m["values"])
    rows = []
    for head, runs in _groups(df):
        real = head["method"] == REAL_LABEL
        recomputed = runs["epsilon"].dropna()
        recomputed = recomputed[recomputed.map(math.isfinite)]
        row = head | {
            "ε recomputed": "—" if real else "∞" if recomputed.empty else f"{recomputed.max():.3f}",
            "δ": "—" if real else f"{runs['delta'].iloc[0]:g}",
            "accountant": "—" if real else runs["accountant"].iloc[0],
            "guarantee": "—" if real else runs["guarantee"].iloc[0],
            "seeds": len(runs),
            "fit [s]": _fmt_cost(_costs(runs), "fit_s"),
        }
        rows.append(row | cells.get(tuple(head.values()), {}))
    return _sorted(rows, _heads(df)[1:-2])


def metric_table(df: pd.DataFrame, metric_label: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """method × (dataset, ε) for one metric: the formatted cells and their means (NaN where empty). With swept
    fields the rows are (method, swept values...), a MultiIndex."""
    sub = df[df["metric_label"] == metric_label]
    swept = sweep_columns(df)
    cells: dict[tuple[str, str], dict[Any, str]] = {}
    means: dict[tuple[str, str], dict[Any, float]] = {}
    for (*row_key, dataset, eps), g in sub.groupby(["label", *swept, "dataset", "eps"]):
        row = tuple(row_key) if swept else row_key[0]
        mean, std, n = tables.stats(g["values"])
        cells.setdefault((dataset, eps), {})[row] = tables.cell_text(mean, std, n)
        means.setdefault((dataset, eps), {})[row] = mean
    cols = sorted(cells, key=lambda c: (c[0], eps_order(c[1])))
    names = {c: f"{c[0]} ε={c[1]}" for c in cols}
    table = pd.DataFrame({names[c]: cells[c] for c in cols})
    numbers = pd.DataFrame({names[c]: means[c] for c in cols}).reindex(table.index)
    order = sorted(table.index, key=_row_order)
    table, numbers = table.loc[order], numbers.loc[order]
    table.index.names = numbers.index.names = ["method", *map(sweep_header, swept)]
    return table.fillna("—"), numbers


def _row_order(row: str | tuple[str, ...]) -> tuple[Any, ...]:
    """A metric table's rows: by method (the real-data row last), then by swept value."""
    label, *swept = (row,) if isinstance(row, str) else row
    return (label == REAL_LABEL, label, *map(sweep_order, swept))


def best_cells(numbers: pd.DataFrame, metric: str) -> set[tuple[Any, str]]:
    """(row, column) of the best mean per column, the real-data row excluded (it is a reference); a row is the
    method, or with swept fields the tuple (method, swept values...)."""
    lower = tables.lower_is_better(metric)
    best = set()
    reference = [(r if isinstance(r, str) else r[0]) == REAL_LABEL for r in numbers.index]
    for col in numbers.columns:
        s = numbers[col][[not r for r in reference]].dropna()
        if not s.empty:
            target = s.min() if lower else s.max()
            best |= {(m, col) for m, v in s.items() if v == target}
    return best


def privacy_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, dataset, ε) with a privacy card: accountant, δ, ε, and each stage's σ, q, steps."""
    rows = []
    for head, runs in _groups(df):
        if head["method"] == REAL_LABEL:
            continue
        cards = [read_json(Path(d) / "privacy.json") for d in runs["run_dir"] if (Path(d) / "privacy.json").is_file()]
        if not cards:
            continue
        eps_values = [c["epsilon"] for c in cards if c.get("epsilon") is not None]
        claimed = [c["claimed_epsilon"] for c in cards if c.get("claimed_epsilon") is not None]
        rows.append(
            head
            | {
                "ε recomputed": f"{max(eps_values):.3f}" if eps_values else "∞",
                "ε claimed": f"{max(claimed):.3f}" if claimed else "—",
                "δ": f"{cards[0]['delta']:g}",
                "accountant": cards[0]["accountant"],
                "guarantee": cards[0]["guarantee"],
                "stages": "; ".join(_stage(s) for s in cards[0].get("stages", [])) or "—",
                "non-private": "; ".join(cards[0].get("non_private", [])) or "—",
            }
        )
    return _sorted(rows, _heads(df)[1:-2])


def _stage(stage: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in tables.stage_numbers(stage).items()]
    return f"{stage['name']} ({stage['mechanism']}: {', '.join(parts)})"


def _hours(c: dict[str, Any]) -> float:
    """Hours of one run: fit + sample + score."""
    return sum(float(c.get(k) or 0.0) for k in ("fit_s", "sample_s", "score_s")) / 3600


def _shared_s(cost: dict[str, Any]) -> dict[str, Any]:
    """The fit seconds of the shared stages a run used (bench.grid.shared: trained once, reused by many runs)."""
    used = cost.get("shared")
    return {"s": sum(float(u["fit_s"]) for u in used.values())} if used else {}


def cost_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, dataset, ε): mean seconds per stage, hours per run, peak memory, device, size. Runs that
    used a shared stage (dpsad's teacher) add a column "shared fit [s]": its own fit time, counted once per
    results folder and not in "fit [s]"."""
    rows = []
    shared = any("shared" in c for c in _costs(df.drop_duplicates("key")))
    for head, runs in _groups(df):
        costs = _costs(runs)
        hours = [_hours(c) for c in costs]
        devices = sorted({c.get("device", "?") for c in costs})
        kind = "GPU" if any(d.startswith("cuda") for d in devices) else "CPU"
        rows.append(
            head
            | {
                "runs": len(runs),
                "fit [s]": _fmt_cost(costs, "fit_s"),
                **({"shared fit [s]": _fmt_cost([_shared_s(c) for c in costs], "s")} if shared else {}),
                "sample [s]": _fmt_cost(costs, "sample_s"),
                "score [s]": _fmt_cost(costs, "score_s"),
                f"{kind}-hours/run": f"{sum(hours) / len(hours):.3g}" if hours else "n/a",
                "peak RSS [MiB]": _fmt_cost(costs, "peak_rss_mib"),
                "peak GPU [MiB]": _fmt_cost(costs, "peak_gpu_mib"),
                "device": ", ".join(devices) or "n/a",
                "parameters": _fmt_cost(costs, "released_parameters"),
            }
        )
    return _sorted(rows, _heads(df)[1:-2])


CURVE_COLUMNS = ["method", "dataset", "ε", "seed", "units", "total", "seconds", "offset_s", "metric", "value",
                 "n_samples", "key"]  # fmt: skip


def curve_frame(store: Store, df: pd.DataFrame, metrics: Collection[str] | None = None) -> pd.DataFrame:
    """The quality-against-compute points (bench.grid.curve) of the frame's finished runs: one row per (run, point,
    metric) with the columns of `df`'s runs that name a line (label, swept values), the dataset, ε and seed; the
    units of training and their total; `seconds` = the fit's own seconds + `offset_s` (the single place a time spent
    before the fit, e.g. a shared pre-trained stage, enters); the value, its metric label and the samples it was
    computed on. Empty when no run has a curve."""
    points = pd.DataFrame(store.curve_rows())
    if points.empty:
        return points
    if metrics is not None:
        points = points[points["metric"].isin(set(metrics))]
    runs = df.drop_duplicates("key")[["key", "label", "dataset", "eps", "seed", *sweep_columns(df)]]
    out = points.merge(runs, on="key")  # inner: a run that is not finished (or not selected) shows no curve
    out["seconds"] = out["seconds"] + out["offset_s"]
    out["metric_label"] = [metric_label_of(m, info_of(i)) for m, i in zip(out["metric"], out["info"], strict=True)]
    return out.drop(columns=["info"]).sort_values(["dataset", "eps", "label", "key", "units", "metric"])


def curve_table(curves: pd.DataFrame) -> pd.DataFrame:
    """curves.csv: curve_frame's rows under CURVE_COLUMNS, `method` naming the line (method and swept values)."""
    named = pd.concat([g.assign(method=text) for text, g in lines(curves)])
    return named.rename(columns={"eps": "ε"})[CURVE_COLUMNS].sort_values(["dataset", "ε", "method", "seed", "units"])


def footnotes(df: pd.DataFrame) -> list[str]:
    return tables.footnotes([*df["label"], *df["metric_label"].dropna()])


HTML = "html"
FORMATS = (*tables.FORMATS, HTML)  # what `bench report --format` takes: the tables' formats and the page


def metric_name(metric_label: str) -> str:
    """ "fd_domain [bench-domain-cnn]" -> "fd_domain"; "acc_cnn‡° [datalens]" -> "acc_cnn"."""
    return metric_label.split(" ")[0].rstrip(TEST_SELECTED_MARK + NON_PRIVATE_SELECTION_MARK + SHORTENED_MARK)


def paper_sections(
    store: Store, out: Path, formats: Collection[str], echo: Callable[[str], None], written: list[Path]
) -> list[tuple[str, Any, pd.DataFrame | None, str]]:
    """Each paper `bench paper ID` ran on this folder, compared again with the folder's runs, its tables written
    to OUT/paper-ID.* (their paths added to `written`): (paper id, plan, comparison frame, error); a record that
    cannot be read (an older bench's, or a table papers.toml no longer has) gives its error instead."""
    from bench.report import paper

    found: list[tuple[str, Any, pd.DataFrame | None, str]] = []
    for record in paper.recorded_runs(store):
        paper_id = str(record.get("paper", "?"))
        try:
            plan = paper.recorded_plan(record)
            frame = paper.compare(plan, store)
        except BenchError as e:
            echo(f"warning: paper {paper_id}: {e}")
            found.append((paper_id, None, None, str(e)))
            continue
        written += paper.write_tables(plan, frame, out, [f for f in formats if f in tables.FORMATS])
        found.append((paper_id, plan, frame, ""))
    return found


def build_report(
    store: Store,
    *,
    out: Path | None,
    keys: set[str] | None,
    echo: Callable[[str], None],
    formats: Collection[str] = ("md", "csv"),
    metrics: Collection[str] | None = None,
    plots: bool = False,
) -> pd.DataFrame:
    """Print the summary table; with `out`, write every table in `formats` (and the plots) there, the audit
    table when the folder holds audits (bench.audit), each paper `bench paper ID` ran on the folder, and with
    "html" in `formats` the page OUT/index.html (bench.report.html)."""
    from bench.report.audit_table import audit_table, stored_audits

    formats = tables.check_formats(formats, FORMATS)
    audits = stored_audits(store) if keys is None else []
    written: list[Path] = []  # every file this report writes, listed at the end of its page
    if audits:
        audit = audit_table(audits)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            written += tables.write(audit, out / "audit", [], formats, index=False,
                                    caption="Privacy audits (one run, 95% lower bounds)")  # fmt: skip
    try:
        df = load_frame(store, keys, metrics)
    except BenchError:  # no finished runs: a folder of audits only shows them
        if not audits:
            raise
        echo(tables.markdown(audit))
        return audit
    summary = summary_table(df)
    notes = footnotes(df)
    echo(tables.markdown(summary))
    for note in notes:
        echo(note)
    if out is None:
        return summary
    out.mkdir(parents=True, exist_ok=True)
    written += tables.write(summary, out / "summary", notes, formats, index=False, caption="Summary")
    per_metric = []
    for metric_label in sorted(df["metric_label"].dropna().unique()):
        metric = metric_name(metric_label)
        table, numbers = metric_table(df, metric_label)
        bold = best_cells(numbers, metric)
        written += tables.write(table, out / metric, [f"metric: {metric_label}", *notes], formats, index=True,
                                caption=f"{metric_label}: mean ± std (n = generator × classifier seeds)",
                                bold=bold)  # fmt: skip
        per_metric.append((metric_label, metric, table, bold))
    privacy = privacy_table(df)
    if not privacy.empty:
        written += tables.write(privacy, out / "privacy", notes, formats, index=False,
                                caption="Privacy accounting per row")  # fmt: skip
    cost = cost_table(df)
    written += tables.write(cost, out / "cost", [], formats, index=False, caption="Cost per run")
    papers = paper_sections(store, out, formats, echo, written) if keys is None else []
    if audits:
        echo("privacy audits:\n" + tables.markdown(audit))
    shown = [f for f in formats if f != HTML]
    message = f"tables ({', '.join(shown)}) written to {out}/" if shown else ""
    files = None
    if plots:
        files = write_plots(df, out / "plots", metrics=metrics)
        message += f"; {len(files)} plot files to {out / 'plots'}/"
    curves = curve_frame(store, df, metrics)
    if not curves.empty:  # `eval.curve` runs: their points as a CSV, their figures beside the other plots
        curve_table(curves).to_csv(out / "curves.csv", index=False)
        written.append(out / "curves.csv")
        message += f"; curve points to {out / 'curves.csv'}"
        if files is not None:
            files += write_curve_plots(curves, out / "plots")
    if HTML in formats:
        from bench.report import html

        page = html.build_page(out, store=store, df=df, summary=summary, notes=notes, per_metric=per_metric,
                               cost=cost, audits=audit if audits else None, papers=papers, plots=files,
                               files=written, curves_csv="curves.csv" if not curves.empty else "")  # fmt: skip
        message += f"; page {page}"
    echo(message.removeprefix("; "))
    return summary
