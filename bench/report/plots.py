"""Figures from the results index (PNG and PDF, matplotlib's Agg canvas, no pyplot state).

- metric against ε: one panel per dataset, one line per method (per method and swept value when runs were
  swept with `--sweep`), error bars = std over seeds (ddof 1);
  finite ε on a log axis, ε = ∞ (non-private runs) at a separate, labelled last position;
- sample grids of all methods side by side for one dataset and ε (from each run's samples.npz);
- cost against quality: hours of the run's own compute (fit + sample, not the harness's scoring) on
  its device against a metric, one point per (method, ε).

Every figure is built from `frame.load_frame`'s frame (one row per (run, metric)), so what is drawn is
what the tables print.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from bench import data
from bench.errors import BenchError
from bench.grid.store import Store
from bench.metrics import select_metrics
from bench.report.frame import NO_VALUE, REAL_LABEL, load_frame, sweep_columns, sweep_header, sweep_order
from bench.report.tables import stats

INF = "∞"
FORMATS = ("png", "pdf")
PER_CLASS = 8  # images a class row in the side-by-side sample grids


def _figure(panels: int, width: float = 4.2, height: float = 3.4) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width * panels, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Figure, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(f".{fmt}") for fmt in FORMATS]
    for path in paths:
        # PNG at zlib level 1: measured faster than the default 6 (13.0 s against 17.3 s for a report of 1,000 runs)
        # and smaller here too (21.8 against 27.0 MiB; the demo's plots 1.5 against 1.9 MiB)
        if path.suffix == ".png":
            fig.savefig(path, dpi=150, pil_kwargs={"compress_level": 1})
        else:
            fig.savefig(path, dpi=150)
    return paths


def _eps_value(label: str) -> float:
    return math.inf if label == INF else float(label)


def eps_positions(labels: Iterable[str]) -> dict[str, float]:
    """x position of each ε label: log10(ε) for finite ε, ∞ one step (≥ 1 decade) right of the largest."""
    labels = list(labels)
    finite = sorted({_eps_value(e) for e in labels if e != INF})
    pos = {f"{e:g}": math.log10(e) for e in finite}
    if INF in labels:
        step = max(1.0, (pos[f"{finite[-1]:g}"] - pos[f"{finite[0]:g}"]) / 3) if finite else 0.0
        pos[INF] = (pos[f"{finite[-1]:g}"] + step) if finite else 0.0
    return pos


def _values(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The rows of `metric` that have a value (a real-data row has no samples, so no cost either)."""
    sub = frame[frame["metric"] == metric]
    return sub[sub["values"].map(bool)]


def _stats(rows: pd.DataFrame) -> tuple[float, float, int]:
    """Mean, std (ddof 1; 0 for one value: no error bar) and count of the pooled values, as the tables pool them."""
    mean, std, n = stats(rows["values"])
    return mean, 0.0 if n == 1 else std, n


def lines(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(legend label, rows) of each line: one per method, or per (method, swept values) when some runs were swept
    (label "dpsad (lambda_adv=1)"), by method and then by swept value."""
    swept = sweep_columns(frame)
    if not swept:
        return [(str(label), g) for label, g in frame.groupby("label", sort=True)]
    out = []
    for (label, *values), g in frame.groupby(["label", *swept], sort=False):
        shown = ", ".join(f"{sweep_header(c)}={v}" for c, v in zip(swept, values, strict=True) if v != NO_VALUE)
        out.append(((label, *map(sweep_order, values)), f"{label} ({shown})" if shown else str(label), g))
    return [(text, g) for _, text, g in sorted(out, key=lambda line: line[0])]


def metric_vs_eps(frame: pd.DataFrame, metric: str) -> Figure:
    """One panel per dataset: mean of `metric` over seeds against ε, one line per method (± std), or per (method,
    swept values) when runs were swept."""
    sub = _values(frame, metric)
    if sub.empty:
        raise BenchError(f"no values of metric {metric!r} in the results")
    datasets = sorted(sub["dataset"].unique())
    fig, axes = _figure(len(datasets))
    title = sub["metric_label"].iloc[0]
    for ax, ds in zip(axes, datasets, strict=True):
        d = sub[sub["dataset"] == ds]
        real = d[d["label"] == REAL_LABEL]
        d = d[d["label"] != REAL_LABEL]
        pos = eps_positions(d["eps"])
        for label, g in lines(d):
            eps = sorted(g["eps"].unique(), key=_eps_value)
            mean, std, _ = zip(*(_stats(g[g["eps"] == e]) for e in eps), strict=True)
            x = np.array([pos[e] for e in eps])
            ax.errorbar(x, np.array(mean), yerr=np.array(std), marker="o", capsize=3, label=str(label))
        if not real.empty:  # the real-data row is a level, not a point at some ε
            ax.axhline(_stats(real)[0], color="0.3", linestyle="--", linewidth=1, label=REAL_LABEL)
        ticks = sorted(pos, key=lambda e: pos[e])
        ax.set_xticks([pos[e] for e in ticks], ticks)
        if INF in pos and len(pos) > 1:
            finite_max = max(p for e, p in pos.items() if e != INF)
            ax.axvline((finite_max + pos[INF]) / 2, color="0.7", linestyle=":", linewidth=1)
        ax.set_xlabel("ε (log scale; ∞ = non-private)")
        ax.set_ylabel(title)
        ax.set_title(ds)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _mosaic(images: np.ndarray, labels: np.ndarray, num_classes: int | None, per_class: int) -> np.ndarray:
    """uint8 [N, C, H, W] -> one uint8 [rows·(H+2)+2, per_class·(W+2)+2, C] image, a row per class."""
    n, c, h, w = images.shape
    if num_classes is not None and labels.size and labels.min() >= 0:
        rows = [np.flatnonzero(labels == k)[:per_class] for k in range(num_classes)]
    else:  # unconditional: the first images, per_class a row
        rows = [np.arange(i, min(i + per_class, n)) for i in range(0, min(n, 10 * per_class), per_class)]
    per_class = max((len(row) for row in rows), default=1)  # no blank columns when classes have fewer
    mosaic = np.full((len(rows) * (h + 2) + 2, per_class * (w + 2) + 2, c), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for col, i in enumerate(row):
            y, x = 2 + r * (h + 2), 2 + col * (w + 2)
            mosaic[y : y + h, x : x + w] = images[i].transpose(1, 2, 0)
    return mosaic


def sample_grids(frame: pd.DataFrame, dataset: str, eps: str, per_class: int = PER_CLASS) -> Figure:
    """Samples of every method (and swept value) at (`dataset`, ε label `eps`) side by side: each one's lowest
    seed."""
    runs = frame[(frame["dataset"] == dataset) & (frame["eps"] == eps) & (frame["label"] != REAL_LABEL)]
    runs = runs.drop_duplicates("key")
    if runs.empty:
        raise BenchError(f"no finished runs on {dataset} at ε = {eps}")
    chosen = [(label, g.sort_values("seed").iloc[0]) for label, g in lines(runs)]
    names = data.class_names(dataset) if dataset in data.DATASETS else None
    fig, axes = _figure(len(chosen), width=3.2, height=3.6)
    for ax, (label, run) in zip(axes, chosen, strict=True):
        path = Path(run["run_dir"]) / "samples.npz"
        ax.set_title(f"{label} (seed {run['seed']})", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        if not path.is_file():
            ax.text(0.5, 0.5, f"no samples.npz in\n{path.parent.name}", ha="center", va="center", fontsize=8)
            continue
        with np.load(path) as z:
            images, labels = z["images"], z["labels"]
        k = len(names) if names else (int(labels.max()) + 1 if labels.size and labels.min() >= 0 else None)
        mosaic = _mosaic(images, labels, k, per_class)
        ax.imshow(mosaic if mosaic.shape[2] == 3 else mosaic[..., 0], cmap="gray", vmin=0, vmax=255)
        if ax is axes[0] and names and labels.size and labels.min() >= 0:
            h = images.shape[2]
            ax.set_yticks([2 + r * (h + 2) + h / 2 for r in range(len(names))], names, fontsize=7)
    fig.suptitle(f"{dataset}, ε = {eps}")
    return fig


def _hours(cost: object) -> tuple[float, str] | None:
    """(fit + sample hours, device type) of a run's cost record (JSON text in the index)."""
    if not isinstance(cost, str):
        return None
    c = json.loads(cost)
    seconds = [c.get(k) for k in ("fit_s", "sample_s")]
    if any(s is None for s in seconds):
        return None
    return sum(seconds) / 3600, str(c.get("device", "cpu")).split(":")[0]


def cost_vs_quality(frame: pd.DataFrame, metric: str) -> Figure:
    """One panel per dataset: mean `metric` against mean compute hours, one point per (method, ε)."""
    sub = _values(frame, metric)
    costs = sub["cost"].map(_hours)
    sub = sub[costs.notna()].assign(hours=costs.dropna().map(lambda c: c[0]), device=costs.dropna().map(lambda c: c[1]))
    if sub.empty:
        raise BenchError(f"no runs with both a cost record and a value of {metric!r}")
    devices = set(sub["device"])
    unit = "GPU-hours" if devices == {"cuda"} else "CPU-hours" if devices == {"cpu"} else "device-hours (CPU and GPU)"
    datasets = sorted(sub["dataset"].unique())
    fig, axes = _figure(len(datasets))
    for ax, ds in zip(axes, datasets, strict=True):
        d = sub[sub["dataset"] == ds]
        for label, g in lines(d):
            eps = sorted(g["eps"].unique(), key=_eps_value)
            hours = [g.loc[g["eps"] == e, "hours"].mean() for e in eps]
            value = [_stats(g[g["eps"] == e])[0] for e in eps]
            ax.plot(np.array(hours), np.array(value), marker="o", linestyle="-", label=str(label))
            for e, x, y in zip(eps, hours, value, strict=True):
                ax.annotate(f"ε={e}", (x, y), xytext=(3, 3), textcoords="offset points", fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log range overlap
        ax.set_xlabel(f"{unit} (fit + sample, mean over seeds)")
        ax.set_ylabel(sub["metric_label"].iloc[0])
        ax.set_title(ds)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _slug(text: str) -> str:
    return "inf" if text == INF else text.replace("/", "-").replace(" ", "_")


def write_plots(
    store_or_frame: Store | pd.DataFrame, out_dir: str | Path, metrics: Iterable[str] | None = None
) -> list[Path]:
    """Write every figure as PNG and PDF under `out_dir`; returns the files written.

    `store_or_frame` is a results Store or `frame.load_frame`'s frame. `metrics` names entries of
    bench.metrics.METRICS (None: every metric in the results); one without any value (all n/a) gets no
    figure. An unknown name is a BenchError. Files:
    metric_vs_eps_<metric>, cost_<metric>, samples_<dataset>_eps<ε>, each .png and .pdf.
    """
    frame = load_frame(store_or_frame) if isinstance(store_or_frame, Store) else store_or_frame
    out = Path(out_dir)
    present = set(frame["metric"].dropna())
    wanted = select_metrics(list(metrics)) if metrics is not None else select_metrics(present)
    wanted = tuple(m for m in wanted if not _values(frame, m).empty)  # all n/a (e.g. unavailable): no plot
    written: list[Path] = []
    for metric in wanted:
        written += _save(metric_vs_eps(frame, metric), out / f"metric_vs_eps_{metric}")
        has_cost = frame.loc[frame["metric"] == metric, "cost"].map(_hours).notna().any()
        if has_cost:
            written += _save(cost_vs_quality(frame, metric), out / f"cost_{metric}")
    for (ds, eps), _ in frame[frame["label"] != REAL_LABEL].groupby(["dataset", "eps"], sort=True):
        written += _save(sample_grids(frame, ds, eps), out / f"samples_{_slug(ds)}_eps{_slug(eps)}")
    return written


# ---------------------------------------------------------------------------------------------------
# Quality against compute (`eval.curve`, bench.grid.curve): report.curve_frame's points
# ---------------------------------------------------------------------------------------------------


def curve_figure(curves: pd.DataFrame, metric: str) -> Figure:
    """`metric` along the fits of one (dataset, ε) (report.curve_frame's rows) in two panels: against the units of
    training and against seconds of fit; one line per method (and swept value), the mean over seeds at each point
    with a band of ± std (ddof 1) where several seeds have it."""
    sub = curves[(curves["metric"] == metric) & curves["value"].notna()]
    if sub.empty:
        raise BenchError(f"no curve points of metric {metric!r}")
    fig, axes = _figure(2)
    for text, g in lines(sub):
        per = g.groupby("units", sort=True).agg(mean=("value", "mean"), std=("value", "std"), s=("seconds", "mean"))
        for ax, x in zip(axes, (per.index.to_numpy(float), per["s"].to_numpy(float)), strict=True):
            (line,) = ax.plot(x, per["mean"].to_numpy(), marker="o", markersize=4, label=text)
            if per["std"].notna().any():
                low, high = (per["mean"] - per["std"]).to_numpy(), (per["mean"] + per["std"]).to_numpy()
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    axis_labels = ("training steps{}\n(DP steps; kernel methods: generator steps after the release)",
                   "seconds of the fit{} (mean over seeds)")  # fmt: skip
    for ax, column, text in zip(axes, ("units", "seconds"), axis_labels, strict=True):
        x = sub[column].to_numpy(float)
        wide = x.min() > 0 and x.max() / x.min() > 20  # methods of very different lengths: a log axis shows each
        if wide:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(text.format(", log scale" if wide else ""))
        ax.set_ylabel(str(sub["metric_label"].iloc[0]))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    samples = ", ".join(str(n) for n in sorted(set(sub["n_samples"])))
    where = f"{sub['dataset'].iloc[0]}, ε = {sub['eps'].iloc[0]}"
    fig.suptitle(f"{where}: {metric} along training ({samples} samples a point)")
    return fig


def write_curve_plots(curves: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """One figure per (dataset, ε, metric) of the curve points as PNG and PDF under `out_dir`,
    curve_<metric>_<dataset>_eps<ε>; returns the files written (none without points)."""
    written: list[Path] = []
    valued = curves[curves["value"].notna()]
    for (ds, eps, metric), g in valued.groupby(["dataset", "eps", "metric"], sort=True):
        written += _save(curve_figure(g, str(metric)), Path(out_dir) / f"curve_{metric}_{_slug(ds)}_eps{_slug(eps)}")
    return written
