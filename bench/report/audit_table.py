"""The reporting side of `bench audit`: the audits a results folder holds, as a table (bench.report and
`bench audit` print it; bench.audit runs the audits)."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd


def _auc_text(aucs: dict[str, list[float]]) -> str:
    return "; ".join(f"{k} {a:.3f} [{lo:.3f}, {hi:.3f}]" for k, (a, lo, hi) in sorted(aucs.items()))


def audit_table(results: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per audit cell: method, dataset, ε, lower bound, AUC [95% CI] of the audit and both controls; the
    index holds each cell's key (not written to the tables' files)."""
    ordered = sorted(results, key=lambda r: (r["dataset"], r["method"], r["target_epsilon"], r["seed"]))
    rows = [
        {
            "method": r["method"],
            "dataset": r["dataset"],
            "ε": f"{r['audit']['epsilon']:.3g}",
            "seed": r["seed"],
            "ε lower bound (95%)": f"{r['epsilon_lb']:.3f}",
            "AUC [95% CI]": _auc_text(r["audit"]["auc"]),
            "negative control AUC": _auc_text(r["negative"]["auc"]),
            "positive control AUC": _auc_text(r["positive"]["auc"]) + f" (ε = {r['positive_epsilon']:g})",
            "verdict": r["verdict"],
            "why": r["reason"],
        }  # fmt: skip
        for r in ordered
    ]
    return pd.DataFrame(rows, index=pd.Index([r["key"] for r in ordered], name="key"))


def stored_audits(store: Any) -> list[dict[str, Any]]:
    return [json.loads(row["info"]) for row in store.audits() if row["status"] == "done" and row["info"]]
