"""What each `bench` command does, as one library call: `run`, `audit`, `score`, `report` and `paper`.

The command line (bench.cli) only declares the options, parses them into GridOptions (what to plan) and Execution
(how to run it), and calls one function here; each returns the command's exit status (0, or 1: a cell failed or an
audit found a violation) and raises BenchError for bad input (one line, exit status 2). `out` gets what the command
prints on stdout (tables), `err` its one-line messages on stderr.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.config import GridOptions, parse_list
from bench.errors import BenchError

if TYPE_CHECKING:
    import torch

    from bench.grid.executors import Executor
    from bench.grid.runner import Runner
    from bench.grid.store import Store

Echo = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class Execution:
    """How a grid runs: the options `bench run` and `bench paper` share beyond what they plan (GridOptions)."""

    results: Path
    device: str = "auto"
    executor: str = "local"
    ray_address: str | None = None
    gpus_per_run: float | None = None
    cpus_per_run: int = 1
    download: bool = False
    inception_weights: str | None = None
    force: bool = False
    debug: bool = False  # print a failed cell's traceback on stderr too

    def executor_and_device(self) -> tuple[Executor, torch.device]:
        """The executor the options ask for (checked before anything runs), and the device of this (the driver's)
        process: --device itself for the local executor; under Ray the workers resolve --device, and the driver
        only loads data (and, for `bench paper`, scores reused runs) on what it has."""
        from bench.grid.executors import make_executor
        from bench.grid.runner import resolve_device

        ex = make_executor(self.executor, ray_address=self.ray_address, gpus_per_run=self.gpus_per_run,
                           cpus_per_run=self.cpus_per_run, device=self.device)  # fmt: skip
        return ex, resolve_device(self.device if self.executor == "local" else "auto")

    def runner(self, store: Store, device: torch.device, opts: GridOptions, metrics: tuple[str, ...] | None) -> Runner:
        from bench.grid.runner import Runner

        return Runner(store, device=device, data_root=opts.data_root, download=self.download, plugins=opts.plugins,
                      force=self.force, metrics=metrics, inception_weights=self.inception_weights,
                      debug=self.debug)  # fmt: skip


def check_weights(path: str | None) -> None:
    """A given Inception weights file must exist and be one, before anything runs."""
    from bench.metrics.inception import check_inception_weights, resolve_inception_weights

    resolved = resolve_inception_weights(path)
    if path is not None and resolved is not None:
        check_inception_weights(resolved)


def metric_names(metrics: str | None) -> tuple[str, ...] | None:
    """--metrics: the checked names, or None (all)."""
    from bench.metrics import select_metrics

    return select_metrics(parse_list(metrics, "--metrics")) if metrics else None


def _warn_notes(specs: Any, err: Echo) -> None:
    for note in dict.fromkeys(n for spec in specs for n in spec.notes):
        err(f"warning: {note}")


def run(
    opts: GridOptions, execution: Execution, *, metrics: str | None = None, noise_source: str = "seed",
    real: bool = True, dry_run: bool = False, out: Echo, err: Echo,
) -> int:  # fmt: skip
    """`bench run`: plan the grid, run every cell not finished (then each dataset's real-data row), print the report
    of its cells."""
    from bench.grid.planning import plan
    from bench.grid.run import run_grid
    from bench.grid.store import Store
    from bench.ui import print_plan

    ex, dev = execution.executor_and_device()
    names = metric_names(metrics)
    check_weights(execution.inception_weights)
    specs = plan(**opts.plan_args(), noise_source=noise_source)
    _warn_notes(specs, err)
    if dry_run:
        print_plan(specs)
        return 0
    store = Store(execution.results)
    r = execution.runner(store, dev, opts, names)
    with ex:
        outcome = run_grid(r, specs, real=real, executor=ex, echo=err)
    if outcome.count("done") + outcome.count("skipped"):
        from bench.report import build_report

        build_report(store, out=None, keys={spec.key for spec in specs} | outcome.real_keys, echo=out)
    return 1 if outcome.errors else 0


def audit(
    opts: GridOptions, execution: Execution, *, canaries: int, samples: int, positive_epsilon: float,
    canary_kind: str, out: Echo, err: Echo,
) -> int:  # fmt: skip
    """`bench audit`: audit each cell with canaries; status 1 when a cell failed or a verdict is VIOLATION."""
    from bench import audit as audits
    from bench.grid.runner import resolve_device
    from bench.grid.store import Store
    from bench.report import tables

    dev = resolve_device(execution.device)
    specs = audits.plan_audits(**opts.plan_args(sweeps=False), canaries=canaries, samples=samples,
                               positive_epsilon=positive_epsilon, canary_kind=canary_kind)  # fmt: skip
    store = Store(execution.results)
    r = execution.runner(store, dev, opts, None)
    for ds in dict.fromkeys(s.dataset for s in specs):
        r.dataset(ds, "train"), r.dataset(ds, "test")
    audits.run_audits(r, specs, echo=err)
    keys = {s.key for s in specs}
    found = [a for a in audits.stored_audits(store) if a["key"] in keys]
    if found:
        out(tables.markdown(audits.audit_table(found)))
    return 1 if r.errors or any(a["verdict"] == "VIOLATION" for a in found) else 0


def score(
    run_dirs: list[Path], *, metrics: str | None, device: str, data_root: str | None, inception_weights: str | None,
    out: Echo,
) -> int:  # fmt: skip
    """`bench score`: re-score the saved samples of finished runs (no retraining)."""
    from bench.grid.runner import Runner, resolve_device
    from bench.grid.store import Store

    names = metric_names(metrics)
    check_weights(inception_weights)
    dev = resolve_device(device)
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise BenchError(f"{run_dir} is not a folder")
        store = Store(run_dir.resolve().parent.parent)
        r = Runner(store, device=dev, data_root=data_root, metrics=names, inception_weights=inception_weights)
        scored = r.score(run_dir)
        shown = ", ".join(f"{k}={v.get('value')}" for k, v in scored.items() if names is None or k in names)
        out(f"{run_dir.name}: {shown}")
    return 0


def report(
    results: Path, *, out_dir: Path, formats: str, metrics: str | None, plots: bool, rebuild: bool, out: Echo
) -> int:
    """`bench report`: the tables and plots of a results folder."""
    from bench.grid.store import Store
    from bench.report import FORMATS, build_report
    from bench.report.tables import check_formats

    chosen = check_formats(parse_list(formats, "--format"), FORMATS)
    names = metric_names(metrics)
    if not results.is_dir():
        raise BenchError(f"results folder {results} does not exist (run `bench run` first)")
    store = Store(results)
    if rebuild:
        store.rebuild()
    build_report(store, out=out_dir, keys=None, echo=out, formats=chosen, metrics=names, plots=plots)
    return 0


@dataclass(frozen=True, kw_only=True)
class PaperRequest:
    """What `bench paper` is asked beyond the grid's options: which table, and what to do with it."""

    paper_id: str | None
    list_tables: bool = False
    run_cells: bool = False
    dry_run: bool = False
    out_dir: Path | None = None
    formats: str = "md,csv,tex"
    estimate: bool = False
    throughput: Path | None = None


def paper(request: PaperRequest, opts: GridOptions, execution: Execution, *, out: Echo, err: Echo) -> int:
    """`bench paper`: a paper's table, published values beside ours; with `run_cells`, the missing cells run first.
    Status 1 when a cell failed."""
    from bench.grid import paper_plan
    from bench.grid.store import Store
    from bench.report import paper as papers_
    from bench.report.tables import check_formats
    from bench.ui import print_plan

    formats = check_formats(parse_list(request.formats, "--format"))
    known = papers_.load_papers()
    published = papers_.load_published(known)
    if request.list_tables:
        out(papers_.list_text(known, published))
        return 0
    if request.paper_id is None:
        raise BenchError(f"give a paper id or --list; known: {', '.join(known)}")
    chosen = papers_.get_paper(known, request.paper_id)
    ex, dev = execution.executor_and_device()
    plan = paper_plan.plan_paper(chosen, known, published, profile=opts.profile, seeds=list(opts.seeds),
                                 accountant=opts.accountant, sets=list(opts.sets), plugins=opts.plugins,
                                 data_root=opts.data_root, sweeps=list(opts.sweeps))  # fmt: skip
    _warn_notes(plan.specs, err)
    if request.throughput is not None and not request.estimate:
        raise BenchError("--throughput goes with --estimate")
    if request.estimate:
        if request.run_cells or request.dry_run:
            raise BenchError("--estimate runs nothing: drop --run / --dry-run")
        _estimate(plan, chosen.id, request.throughput, dev, request.out_dir or Path("reports"), out=out, err=err)
        return 0
    if request.dry_run:
        out(paper_plan.plan_text(plan))
        print_plan(list(plan.specs))
        return 0
    results = execution.results
    if not request.run_cells and not results.is_dir():
        raise BenchError(f"results folder {results} does not exist (run `bench paper {chosen.id} --run` first)")
    store = Store(results)
    r = None
    if request.run_cells and plan.specs:
        check_weights(execution.inception_weights)
        r = execution.runner(store, dev, opts, plan.run_metrics())
    with ex:
        frame, failed = paper_plan.reproduce(plan, store, r, echo=err, executor=ex)
    if plan.specs:  # `bench report` shows this paper's table on its HTML page
        papers_.record_run(store, plan, profile=opts.profile, seeds=list(opts.seeds), accountant=opts.accountant,
                           sets=list(opts.sets), sweeps=list(opts.sweeps),
                           plugins=[str(Path(p).resolve()) for p in opts.plugins],
                           data_root=str(Path(opts.data_root).resolve()) if opts.data_root else None)  # fmt: skip
    out(papers_.to_markdown(plan, frame))
    if request.out_dir is not None:
        paths = papers_.write_tables(plan, frame, request.out_dir, formats)
        err(f"table written to {', '.join(map(str, paths))}")
    return 1 if failed else 0


def _estimate(
    plan: Any, paper_id: str, throughput: Path | None, device: torch.device, out_dir: Path, *, out: Echo, err: Echo
) -> None:
    from bench import estimate as est

    measured = est.load_throughput(throughput) if throughput is not None else None
    frame, used = est.estimate(plan.specs, measured, device=device, metrics=plan.run_metrics(), echo=err)
    text = est.to_markdown(frame, f"{paper_id}", used.device)
    out(text)
    paths = est.write(frame, text, out_dir, paper_id)
    err(f"estimate written to {', '.join(map(str, paths))}")


def list_all(plugins: tuple[str, ...], *, out: Echo) -> int:
    """`bench list`: the registered methods (with a plugin's), datasets, metrics, protocols and profiles."""
    import sys

    from bench import config, data
    from bench.grid import registry
    from bench.metrics import METRICS
    from bench.metrics.protocols import PROTOCOLS

    reg = registry.methods(plugins)
    out("methods:")
    for name, cls in sorted(reg.items()):
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        caps = f"guarantee={cls.guarantee}, conditional={cls.conditional}, needs_public_data={cls.needs_public_data}"
        out(f"  {name:<12} {doc[0] if doc else ''}\n  {'':<12} [{caps}]")
    out("datasets (C×H×W, classes, training records; --data-root DIR or BENCH_DATA for the files):")
    for name in data.DATASETS:
        try:
            d = data.spec(name)
            count = f"{d.num_train:,} train records"
        except BenchError:  # a count read from the dataset's files, which are not here
            d, count = data.spec_without_files(name), "train records counted from its files (not found)"
        out(f"  {name:<16} {d.channels}×{d.height}×{d.width}, {d.num_classes} classes, {count}")
    out(f"  {'folder:PATH':<16} your images, one sub-folder per class (options: ?size=32&channels=3&test=0.1&seed=0)")
    out("metrics:")
    for name, what in METRICS.items():
        out(f"  {name:<20} {what}")
    out("downstream protocols (set one with --set eval.<protocol>.<field>=value; records say `shortened`):")
    for name, p in PROTOCOLS.items():
        out(f"  {name:<12} {p.title}\n  {'':<12} {p.reference}")
    out("profiles:")
    for name in config.PROFILES:
        out(f"  {name}")
    return 0
