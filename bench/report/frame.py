"""The results frame: one row per (finished run, metric) from the results index, with the values each run
contributes to a table cell (generator seed × classifier seeds), its ε label, its row label and its metric
label with the marks. `bench report`, the plots and `bench paper` all read it; the marks and their footnotes
live here so that every table says the same thing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import BenchError
from bench.grid.store import Store

PARTIAL_MARK = "†"
TEST_SELECTED_MARK = "‡"
NON_PRIVATE_SELECTION_MARK = "∗"
SHORTENED_MARK = "°"
FOOTNOTES = {
    PARTIAL_MARK: "partial guarantee: part of the method touches private data outside a DP mechanism "
    "(see the run's privacy.json, `non_private`); its ε does not cover the whole pipeline.",
    TEST_SELECTED_MARK: "test-selected: best real test accuracy over epochs (DataLens/DPGEN protocol); "
    "optimistic, shown only for comparison with published tables.",
    NON_PRIVATE_SELECTION_MARK: "selected on real data without DP: the epoch is chosen by the accuracy on real "
    "validation records carved from the training split, without noise (DPImageBench's reported number; its "
    "noisy alternative's cost is in each record's `selection_privacy`); not private, not in the privacy card.",
    SHORTENED_MARK: "shortened protocol: fewer epochs or samples than the reference code (each record's "
    "`shortened` lists [reference, used]); not comparable with a published cell as it stands.",
}
REAL_LABEL = "real data"
SWEEP_PREFIX = "sweep:"  # frame column of a swept field: "sweep:lambda_adv" (its table column: "lambda_adv")
NO_VALUE = "—"  # a run without the swept field (another method, the real-data row)


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
    runs_df = with_sweeps(runs_df)
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


def with_sweeps(runs: pd.DataFrame) -> pd.DataFrame:
    """`runs` (one row per run) with a column SWEEP_PREFIX + field, the value as text, for every field that some run
    was swept over (`--sweep`; the index's `sweep` column); none when no run was. A run that lacks a recorded value
    gets the one its config.json holds (a cell reused from a grid without that sweep), else NO_VALUE."""
    recorded = [info_of(raw) for raw in runs.get("sweep", pd.Series([None] * len(runs), dtype=object))]
    fields = list(dict.fromkeys(f for sweep in recorded for f in sweep))
    if not fields:
        return runs
    configs = [
        sweep if all(f in sweep for f in fields) else {**_config_of(run_dir), **sweep}
        for sweep, run_dir in zip(recorded, runs["run_dir"], strict=True)
    ]
    columns = {SWEEP_PREFIX + f: [sweep_text(c[f]) if f in c else NO_VALUE for c in configs] for f in fields}
    return runs.assign(**columns)


def _config_of(run_dir: str) -> dict[str, Any]:
    try:
        config = json.loads((Path(run_dir) / "config.json").read_text()).get("config")
    except (OSError, json.JSONDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def sweep_columns(df: pd.DataFrame) -> list[str]:
    """The frame's swept-field columns (SWEEP_PREFIX + field), in the order the fields were first swept."""
    return [c for c in df.columns if isinstance(c, str) and c.startswith(SWEEP_PREFIX)]


def sweep_header(column: str) -> str:
    """ "sweep:lambda_adv" -> "lambda_adv", the column's name in a table."""
    return column.removeprefix(SWEEP_PREFIX)


def sweep_text(value: Any) -> str:
    """A swept value as a table shows it: 1.0 -> "1", True -> "true", [1, 2] -> "[1, 2]"."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def sweep_order(text: str) -> tuple[int, float, str]:
    """Sort key of a swept value's text: numbers by value, then words, NO_VALUE last."""
    try:
        return 0, float(text), ""
    except ValueError:
        return (2 if text == NO_VALUE else 1), 0.0, text


def metric_label_of(metric: str, info: dict[str, Any]) -> str:
    how = info.get("protocol") or info.get("extractor")
    mark = "".join(
        m
        for m, on in (
            (TEST_SELECTED_MARK, info.get("test_selected")),
            (NON_PRIVATE_SELECTION_MARK, info.get("non_private_selection")),
            (SHORTENED_MARK, info.get("shortened")),
        )
        if on
    )
    return f"{metric}{mark} [{how}]" if how else f"{metric}{mark}"
