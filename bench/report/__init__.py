"""Reporting: what a results folder holds, as tables, figures and one HTML page. It reads results and never plans
or runs (tests/test_imports.py).

    frame.py         the results frame: one row per (finished run, metric), with values, labels and marks
    tables.py        pooling (mean ± std over seeds), formatting and writing Markdown, CSV and LaTeX
    summary.py       `bench report`'s tables (summary, per metric, cost) and build_report
    plots.py         figures (metric against ε, cost, quality against compute)
    html.py          the HTML page, through Jinja2 from templates/
    paper.py         published tables beside ours, from the plan `bench paper` recorded
    audit_table.py   the audits' table
"""

from __future__ import annotations

from bench.report.summary import FORMATS, best_cells, build_report, cost_table, metric_table, summary_table

__all__ = ["FORMATS", "best_cells", "build_report", "cost_table", "metric_table", "summary_table"]
