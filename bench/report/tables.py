"""Tables: how `bench report` and `bench paper` pool, format and write what they show.

- Pooling: a cell pools every value behind it (generator seeds × classifier seeds, the `values` of
  bench.report.frame.load_frame's rows): `pooled`, `stats` (mean, std with ddof 1, n) and `mean_std`, the cell text
  "mean ± std (n=N)" with the marks of the cell after the mean.
- Marks: `footnotes` gives the footnote of every mark (bench.report.frame.FOOTNOTES, or a caller's superset) that
  some text of the table carries.
- Writing: one table as Markdown (`markdown`), CSV (pandas) and LaTeX (`to_latex`: booktabs, chosen cells in
  bold, footnotes under it), through `write`.

LaTeX is written here rather than by pandas' Styler.to_latex: the Styler needs jinja2 (not otherwise a
dependency) and its LaTeX escaping leaves the symbols our tables print (±, ε, σ, δ, ∞, †, ‡, ∗, §, ¶, °) as
Unicode, which pdflatex rejects without extra packages; `tex_escape` maps them to math-mode commands.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import BenchError
from bench.report.frame import FOOTNOTES

FORMATS = ("md", "csv", "tex")
LOWER_IS_BETTER = ("fd_", "fid_", "kid_")  # metric name prefixes; every other metric: higher is better


def lower_is_better(metric: str) -> bool:
    return metric.startswith(LOWER_IS_BETTER)


def stage_numbers(stage: Mapping[str, Any]) -> dict[str, str]:
    """The numbers of one stage of a privacy card as every table prints them (name -> text), only those the stage
    has: σ (b for Laplace: its scale relative to L1 sensitivity 1), q, steps, count, C."""
    scale = "b" if stage["mechanism"] == "laplace" else "σ"
    out = {scale: f"{stage['noise_multiplier']:.4g}"}
    if stage.get("sampling_rate") is not None:
        out["q"] = f"{stage['sampling_rate']:.4g}"
    for k in ("steps", "count"):
        if k in stage:
            out[k] = str(stage[k])
    if stage.get("max_grad_norm") is not None:
        out["C"] = f"{stage['max_grad_norm']:g}"
    return out


def pooled(values: Iterable[Iterable[float]]) -> list[float]:
    """Every value behind a cell: the concatenation of each (run, metric) row's values."""
    return [float(v) for vs in values for v in vs]


def stats(values: Iterable[Iterable[float]]) -> tuple[float, float, int]:
    """Mean, std (ddof 1; NaN for fewer than two values) and count of the pooled values (NaN mean when none)."""
    v = pd.Series(pooled(values), dtype=float)
    if v.empty:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def cell_text(mean: float, std: float, n: int, marks: str = "") -> str:
    """ "mean[marks] ± std (n=N)", "mean[marks] (n=1)" for one value, "n/a" for none."""
    if n == 0:
        return "n/a"
    if n == 1:
        return f"{mean:.2f}{marks} (n=1)"
    return f"{mean:.2f}{marks} ± {std:.2f} (n={n})"


def mean_std(values: Iterable[Iterable[float]], marks: str = "") -> str:
    """The cell text of the pooled values (see cell_text)."""
    return cell_text(*stats(values), marks=marks)


def footnotes(texts: Iterable[str], notes: Mapping[str, str] = FOOTNOTES) -> list[str]:
    """ "mark text" for every mark of `notes` that occurs in one of `texts` (labels, metric names, marks)."""
    used = "".join(t for t in texts if isinstance(t, str))
    return [f"{mark} {text}" for mark, text in notes.items() if mark in used]


def check_formats(formats: Collection[str], allowed: Collection[str] = FORMATS) -> list[str]:
    """`formats` without repeats, each one of `allowed` (BenchError otherwise)."""
    bad = [f for f in formats if f not in allowed]
    if bad or not formats:
        raise BenchError(f"unknown format {bad[0] if bad else '(none)'!r}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(formats))


def markdown(table: pd.DataFrame, index: bool = False) -> str:
    """A pipe table (GitHub Markdown) of `table`, its index as the first column when `index`."""
    t = table.reset_index() if index else table
    header = "| " + " | ".join(map(str, t.columns)) + " |"
    sep = "|" + "|".join("---" for _ in t.columns) + "|"
    body = ["| " + " | ".join(map(str, r)) + " |" for r in t.itertuples(index=False)]
    return "\n".join([header, sep, *body])


_TEX = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "ε": r"$\varepsilon$",
    "σ": r"$\sigma$", "δ": r"$\delta$", "∞": r"$\infty$", "—": "---", "†": r"$^\dagger$", "‡": r"$^\ddagger$",
    "×": r"$\times$", "≥": r"$\geq$", "≤": r"$\leq$", "§": r"\S{}", "¶": r"\P{}", "°": r"$^\circ$", "∗": r"$^{\ast}$",
    "→": r"$\to$", "−": r"$-$",
}  # fmt: skip


def tex_escape(text: Any) -> str:
    """Plain text (with the symbols our tables use) as LaTeX that compiles without extra packages."""
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def to_latex(
    table: pd.DataFrame,
    *,
    index: bool,
    caption: str,
    bold: Collection[tuple[Any, str]] = (),
    notes: Collection[str] = (),
) -> str:
    """A booktabs table (toprule, midrule, bottomrule); cells in `bold` ((row label, column)) in bold;
    `notes` (the footnotes of the marks) printed under it. The row label is the first column's text, or with
    `index` and a MultiIndex (rows keyed by method and swept values) the tuple of the index levels' texts."""
    t = table.reset_index() if index else table
    levels = table.index.nlevels if index else 1
    bold = set(bold)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{tex_escape(caption)}}}",
        r"\begin{tabular}{l" + "r" * (len(t.columns) - 1) + "}",
        r"\toprule",
        " & ".join(tex_escape(c) for c in t.columns) + r" \\",
        r"\midrule",
    ]
    for row in t.itertuples(index=False):
        cells = [tex_escape(row[0])]
        label = row_label(row, levels)
        for col, value in zip(t.columns[1:], row[1:], strict=True):
            text = tex_escape(value)
            cells.append(rf"\textbf{{{text}}}" if (label, str(col)) in bold else text)
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [rf"\par{{\footnotesize {tex_escape(n)}}}" for n in notes]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def row_label(values: Sequence[Any], levels: int) -> str | tuple[str, ...]:
    """The label a bold cell names its row by: the first value's text, or the tuple of the first `levels`."""
    return str(values[0]) if levels <= 1 else tuple(str(v) for v in values[:levels])


def write(
    table: pd.DataFrame,
    stem: Path,
    notes: list[str],
    formats: Collection[str],
    *,
    index: bool,
    caption: str,
    bold: Collection[tuple[Any, str]] = (),
) -> list[Path]:
    """`table` as stem.md (with the notes under it), stem.csv and stem.tex, as `formats` asks; the paths written."""
    paths = []
    if "csv" in formats:
        table.to_csv(path := stem.with_suffix(".csv"), index=index)
        paths.append(path)
    if "md" in formats:
        (path := stem.with_suffix(".md")).write_text(markdown(table, index) + "\n\n" + "\n".join(notes) + "\n")
        paths.append(path)
    if "tex" in formats:
        (path := stem.with_suffix(".tex")).write_text(
            to_latex(table, index=index, caption=caption, bold=bold, notes=notes)
        )
        paths.append(path)
    return paths
