"""Tables from the results index: method × (dataset, ε), mean ± std over seeds, with the checked ε.

The ε column is the harness's recomputation from each run's ledger (never the method's claim); a row
whose guarantee is partial carries a mark and a footnote; the non-private reference shows ε = ∞.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from bench.errors import BenchError
from bench.store import Store

PARTIAL_MARK = "†"
TEST_SELECTED_MARK = "‡"
FOOTNOTES = {
    PARTIAL_MARK: "partial guarantee: part of the method touches private data outside a DP mechanism "
    "(see the run's privacy.json, `non_private`); its ε does not cover the whole pipeline.",
    TEST_SELECTED_MARK: "test-selected: best real test accuracy over epochs (DataLens/DPGEN protocol); "
    "optimistic, shown only for comparison with published tables.",
}


def _eps_label(e: float | None) -> str:
    """The target ε of a run; a non-private run has none (NULL in the index): ∞."""
    return "∞" if e is None or not math.isfinite(e) else f"{e:g}"


def _fmt(values: pd.Series) -> str:
    v = values.dropna()
    if v.empty:
        return "n/a"
    if len(v) == 1:
        return f"{v.iloc[0]:.2f} (n=1)"
    return f"{v.mean():.2f} ± {v.std(ddof=1):.2f} (n={len(v)})"


def load_frame(store: Store, keys: set[str] | None = None) -> pd.DataFrame:
    """One row per (finished run, metric)."""
    runs, metrics = store.rows()
    if not runs:
        raise BenchError(f"no runs in {store.root} (run `bench run` first)")
    runs_df = pd.DataFrame(runs)
    runs_df = runs_df[runs_df["status"] == "done"]
    if keys is not None:
        runs_df = runs_df[runs_df["key"].isin(keys)]
    if runs_df.empty:
        raise BenchError(f"no finished runs in {store.root}")
    met_df = pd.DataFrame(metrics, columns=["key", "metric", "value", "info"])
    df = runs_df.merge(met_df, on="key", how="left")
    df["eps"] = df["target_epsilon"].map(_eps_label)
    df["label"] = df["method"] + df["guarantee"].map(lambda g: PARTIAL_MARK if g == "partial" else "")
    df["metric_label"] = df.apply(_metric_label, axis=1)
    return df


def _metric_label(row: pd.Series) -> str:
    info = json.loads(row["info"]) if isinstance(row["info"], str) else {}
    how = info.get("extractor") or info.get("protocol")
    mark = TEST_SELECTED_MARK if info.get("test_selected") else ""
    return f"{row['metric']}{mark} [{how}]" if how else f"{row['metric']}{mark}"


def _eps_order(label: str) -> float:
    return math.inf if label == "∞" else float(label)


def _fmt_cost(runs: pd.DataFrame, key: str) -> str:
    values = [json.loads(c).get(key) for c in runs.get("cost", pd.Series(dtype=object)).dropna()]
    values = [v for v in values if v is not None]
    return f"{sum(values) / len(values):.0f}" if values else "n/a"


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, dataset, ε): the recomputed ε, δ, accountant, guarantee and every metric."""
    rows = []
    for (label, dataset, eps), g in df.groupby(["label", "dataset", "eps"], sort=False):
        runs = g.drop_duplicates("key")
        recomputed = runs["epsilon"].dropna()
        row = {
            "method": label,
            "dataset": dataset,
            "ε target": eps,
            "ε recomputed": "∞" if recomputed.empty else f"{recomputed.max():.3f}",
            "δ": f"{runs['delta'].iloc[0]:g}",
            "accountant": runs["accountant"].iloc[0],
            "guarantee": runs["guarantee"].iloc[0],
            "seeds": len(runs),
            "fit [s]": _fmt_cost(runs, "fit_s"),
        }
        for metric, m in g.groupby("metric_label"):
            row[metric] = _fmt(m["value"])
        rows.append(row)
    out = pd.DataFrame(rows)
    out["_e"] = out["ε target"].map(_eps_order)
    return out.sort_values(["dataset", "_e", "method"]).drop(columns="_e").reset_index(drop=True)


def metric_table(df: pd.DataFrame, metric_label: str) -> pd.DataFrame:
    """method × (dataset, ε) for one metric."""
    sub = df[df["metric_label"] == metric_label]
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for (label, dataset, eps), g in sub.groupby(["label", "dataset", "eps"]):
        cells.setdefault((dataset, eps), {})[label] = _fmt(g["value"])
    cols = sorted(cells, key=lambda c: (c[0], _eps_order(c[1])))
    table = pd.DataFrame({f"{d} ε={e}": cells[(d, e)] for d, e in cols})
    table.index.name = "method"
    return table.fillna("—")


def _footnotes(df: pd.DataFrame) -> list[str]:
    used = "".join(df["label"]) + "".join(df["metric_label"].dropna())
    return [f"{mark} {text}" for mark, text in FOOTNOTES.items() if mark in used]


def build_report(store: Store, *, out: Path | None, keys: set[str] | None, echo: Callable[[str], None]) -> pd.DataFrame:
    """Print the summary table (and write Markdown + CSV tables to `out` when given)."""
    df = load_frame(store, keys)
    summary = summary_table(df)
    notes = _footnotes(df)
    echo(_markdown(summary, index=False))
    for note in notes:
        echo(note)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _write(summary, out / "summary", notes, index=False)
        for metric_label in sorted(df["metric_label"].dropna().unique()):
            slug = metric_label.split(" ")[0].rstrip(TEST_SELECTED_MARK)
            _write(metric_table(df, metric_label), out / slug, [f"metric: {metric_label}", *notes], index=True)
        echo(f"tables written to {out}/")
    return summary


def _markdown(table: pd.DataFrame, index: bool) -> str:
    t = table.reset_index() if index else table
    header = "| " + " | ".join(map(str, t.columns)) + " |"
    sep = "|" + "|".join("---" for _ in t.columns) + "|"
    body = ["| " + " | ".join(map(str, r)) + " |" for r in t.itertuples(index=False)]
    return "\n".join([header, sep, *body])


def _write(table: pd.DataFrame, stem: Path, notes: list[str], *, index: bool) -> None:
    table.to_csv(stem.with_suffix(".csv"), index=index)
    stem.with_suffix(".md").write_text(_markdown(table, index) + "\n\n" + "\n".join(notes) + "\n")
