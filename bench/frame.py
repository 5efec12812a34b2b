"""The results frame: one row per (finished run, metric) from the results index, with the values each run
contributes to a table cell (generator seed × classifier seeds), its ε label, its row label and its metric
label with the marks. `bench report`, the plots and `bench paper` all read it; the marks and their footnotes
live here so that every table says the same thing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from typing import Any

import pandas as pd

from bench.errors import BenchError
from bench.store import Store

PARTIAL_MARK = "†"
TEST_SELECTED_MARK = "‡"
SHORTENED_MARK = "°"
FOOTNOTES = {
    PARTIAL_MARK: "partial guarantee: part of the method touches private data outside a DP mechanism "
    "(see the run's privacy.json, `non_private`); its ε does not cover the whole pipeline.",
    TEST_SELECTED_MARK: "test-selected: best real test accuracy over epochs (DataLens/DPGEN protocol); "
    "optimistic, shown only for comparison with published tables.",
    SHORTENED_MARK: "shortened protocol: fewer epochs or samples than the reference code (each record's "
    "`shortened` lists [reference, used]); not comparable with a published cell as it stands.",
}
REAL_LABEL = "real data"


def eps_label(e: float | None) -> str:
    """The target ε of a run; a non-private run has none (NULL in the index): ∞."""
    return "∞" if e is None or not math.isfinite(e) else f"{e:g}"


def eps_order(label: str) -> float:
    return math.inf if label == "∞" else float(label)


def info_of(raw: Any) -> dict[str, Any]:
    return json.loads(raw) if isinstance(raw, str) else {}


def values_of(value: Any, info: dict[str, Any]) -> list[float]:
    """Every value behind one (run, metric): its classifier seeds' values, else the value itself."""
    per_seed = info.get("per_seed")
    if isinstance(per_seed, list) and per_seed:
        return [float(v) for v in per_seed if v is not None]
    return [] if value is None or pd.isna(value) else [float(value)]


def load_frame(store: Store, keys: set[str] | None = None, metrics: Collection[str] | None = None) -> pd.DataFrame:
    """One row per (finished run, metric); `values` lists the values the run contributes to a cell."""
    runs, metric_rows = store.rows()
    if not runs:
        raise BenchError(f"no runs in {store.root} (run `bench run` first)")
    runs_df = pd.DataFrame(runs)
    runs_df = runs_df[runs_df["status"] == "done"]
    if keys is not None:
        runs_df = runs_df[runs_df["key"].isin(keys)]
    if runs_df.empty:
        raise BenchError(f"no finished runs in {store.root}")
    # where the folder is now: the index records the path a run was started with (relative to its cwd then)
    runs_df = runs_df.assign(run_dir=[str(store.run_dir(k)) for k in runs_df["key"]])
    met_df = pd.DataFrame(metric_rows, columns=["key", "metric", "value", "info"])
    if metrics is not None:
        met_df = met_df[met_df["metric"].isin(set(metrics))]
    df = runs_df.merge(met_df, on="key", how="left")
    infos = [info_of(raw) for raw in df["info"]]
    df["values"] = [values_of(v, i) for v, i in zip(df["value"], infos, strict=True)]
    df["eps"] = df["target_epsilon"].map(eps_label)
    df["label"] = [
        REAL_LABEL if m == "real" else m + (PARTIAL_MARK if g == "partial" else "")
        for m, g in zip(df["method"], df["guarantee"], strict=True)
    ]
    df["metric_label"] = [
        metric_label_of(m, i) if isinstance(m, str) else None for m, i in zip(df["metric"], infos, strict=True)
    ]
    return df


def metric_label_of(metric: str, info: dict[str, Any]) -> str:
    how = info.get("protocol") or info.get("extractor")
    mark = (TEST_SELECTED_MARK if info.get("test_selected") else "") + (SHORTENED_MARK if info.get("shortened") else "")
    return f"{metric}{mark} [{how}]" if how else f"{metric}{mark}"
