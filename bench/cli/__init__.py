"""The `bench` command line: each command is its options plus one call into the library.

Every error a user can cause is a BenchError: printed as one line on stderr, exit status 2.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bench import config
from bench.errors import BenchError, one_line

if TYPE_CHECKING:
    import torch

    from bench import grid

app = typer.Typer(
    help="Benchmark differentially private generative models of images at matched (ε, δ).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def debug() -> bool:
    """--debug or BENCH_DEBUG=1: tracebacks of failed cells and internal errors are printed."""
    return os.environ.get("BENCH_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


@app.callback()
def _global(
    debug_: Annotated[
        bool, typer.Option("--debug", help="Print the traceback of a failed cell or an internal error (BENCH_DEBUG=1).")
    ] = False,
) -> None:
    if debug_:
        os.environ["BENCH_DEBUG"] = "1"


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn BenchError into one line on stderr and exit status 2; show plugin warnings as one line."""

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        typer.echo(f"warning: {message}", err=True)

    old = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    except BenchError as e:
        raise _fail(str(e)) from None
    finally:
        warnings.showwarning = old


def _mount_privacy() -> None:
    from bench.cli import privacy as privacy_cli

    app.add_typer(privacy_cli.app, name="privacy", help="Privacy calculator: ε for a σ, or σ for an ε.")


_mount_privacy()

Plugins = Annotated[
    list[Path] | None, typer.Option("--plugin", help="A local .py file defining a method (repeatable).")
]
InceptionWeights = Annotated[
    str | None,
    typer.Option(
        "--inception-weights",
        envvar="BENCH_INCEPTION_WEIGHTS",
        help="torch-fidelity Inception-v3 weights file for the standard FID/KID/IS (default: its cache).",
    ),
]
ResultsDir = Annotated[Path, typer.Option("--results", help="Results folder.", envvar="BENCH_RESULTS")]
Profile = Annotated[str, typer.Option("--profile", help="smoke | demo | cpu | paper | path to a .toml profile.")]
Seeds = Annotated[str, typer.Option("--seeds", help="Comma-separated generator seeds.")]
Accountant = Annotated[str, typer.Option("--accountant", help="rdp | pld | prv, one for the whole grid.")]
Sets = Annotated[
    list[str] | None,
    typer.Option("--set", help="Set a config field: field=value (all methods), METHOD.field=value, eval.key=value."),
]
Sweeps = Annotated[
    list[str] | None,
    typer.Option(
        "--sweep",
        help="A grid axis over a config field: METHOD.field=v1,v2,... (or field=v1,v2,... for all methods); "
        "repeatable, several multiply.",
    ),
]
Device = Annotated[str, typer.Option("--device", help="auto | cpu | cuda[:N].")]
DataRoot = Annotated[
    str | None, typer.Option("--data-root", envvar="BENCH_DATA", help="Folder with the dataset files.")
]
Download = Annotated[
    bool, typer.Option("--download", help="Let torchvision download missing datasets (needs internet).")
]
ExecutorKind = Annotated[
    str,
    typer.Option(
        "--executor",
        help="local: the cells one after another in this process | ray: one Ray task per cell, on a local Ray "
        "instance or the cluster at --ray-address (pip install 'bench-dp-gen[ray]').",
    ),
]
RayAddress = Annotated[
    str | None,
    typer.Option("--ray-address", help="With --executor ray: the cluster to join (default: a local Ray instance)."),
]
GpusPerRun = Annotated[
    float | None,
    typer.Option(
        "--gpus-per-run",
        help="With --executor ray: GPUs each cell reserves (0.5: two cells share one; default 1 when the cluster "
        "has GPUs, else 0).",
    ),
]
CpusPerRun = Annotated[
    int, typer.Option("--cpus-per-run", help="With --executor ray: CPUs each cell reserves (its torch threads).")
]


def _check_weights(path: str | None) -> None:
    """A given Inception weights file must exist and be one, before anything runs."""
    from bench.metrics.inception import check_inception_weights, resolve_inception_weights

    resolved = resolve_inception_weights(path)
    if path is not None and resolved is not None:
        check_inception_weights(resolved)


def _err(line: str) -> None:
    typer.echo(line, err=True)


def _executor(
    kind: str, ray_address: str | None, gpus_per_run: float | None, cpus_per_run: int, device: str
) -> tuple[grid.Executor, torch.device]:
    """The executor the options ask for, and the device of this (the driver's) process: --device itself for the
    local executor; under Ray the workers resolve --device, and the driver only loads data (and, for `bench
    paper`, scores reused runs) on what it has."""
    from bench import grid
    from bench.grid.executors import make_executor

    ex = make_executor(kind, ray_address=ray_address, gpus_per_run=gpus_per_run, cpus_per_run=cpus_per_run,
                       device=device)  # fmt: skip
    return ex, grid.resolve_device(device if kind == "local" else "auto")


@app.command()
def run(
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated method names (see `bench list`).")],
    eps: Annotated[str, typer.Option("--eps", help="Comma-separated target ε values, e.g. 1,10.")] = "1,10",
    dataset: Annotated[str, typer.Option("--dataset", "--datasets", help="Comma-separated datasets.")] = "fmnist",
    seeds: Seeds = "0",
    delta: Annotated[
        float | None, typer.Option("--delta", help="δ (default: 1e-5 below 100k records, else 10^-(floor(log10 N)+1)).")
    ] = None,
    accountant: Accountant = "rdp",
    profile: Profile = "smoke",
    set_: Sets = None,
    sweep: Sweeps = None,
    device: Device = "auto",
    executor: ExecutorKind = "local",
    ray_address: RayAddress = None,
    gpus_per_run: GpusPerRun = None,
    cpus_per_run: CpusPerRun = 1,
    results: ResultsDir = Path("results"),
    data_root: DataRoot = None,
    download: Download = False,
    plugin: Plugins = None,
    metrics: Annotated[str | None, typer.Option("--metrics", help="Comma-separated metrics (default: all).")] = None,
    inception_weights: InceptionWeights = None,
    force: Annotated[bool, typer.Option("--force", help="Recompute finished runs.")] = False,
    no_real: Annotated[
        bool, typer.Option("--no-real", help="Skip the real-data reference row of each dataset.")
    ] = False,
    noise_source: Annotated[
        str,
        typer.Option(
            "--noise-source",
            help="seed | os: draw the private fits' noise (and batches, initial weights) from the run's seed "
            "(bit-reproducible) or from OS entropy (never written; not bit-reproducible).",
        ),
    ] = "seed",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the resolved grid and configs, run nothing.")
    ] = False,
) -> None:
    """Train and score every (method, dataset, ε, seed) cell of a grid, then each dataset's real-data row
    (the same metrics on real data); finished cells are skipped."""
    from bench import grid
    from bench.grid.store import Store
    from bench.ui import print_plan

    with user_errors():
        opts = config.GridOptions.parse(methods=methods, eps=eps, dataset=dataset, seeds=seeds, delta=delta,
                                        accountant=accountant, profile=profile, sets=set_, sweeps=sweep,
                                        plugins=plugin, data_root=data_root)  # fmt: skip
        plugins = opts.plugins
        ex, dev = _executor(executor, ray_address, gpus_per_run, cpus_per_run, device)
        from bench.metrics import select_metrics

        metric_names = select_metrics(config.parse_list(metrics, "--metrics")) if metrics else None
        _check_weights(inception_weights)
        specs = grid.plan(**opts.plan_args(), noise_source=noise_source)
        for note in dict.fromkeys(n for spec in specs for n in spec.notes):
            typer.echo(f"warning: {note}", err=True)
        if dry_run:
            print_plan(specs)
            return
        store = Store(results)
        r = grid.Runner(
            store,
            device=dev,
            data_root=data_root,
            download=download,
            plugins=plugins,
            force=force,
            metrics=metric_names,
            inception_weights=inception_weights,
            debug=debug(),
        )
        with ex:
            outcome = grid.run_grid(r, specs, real=not no_real, executor=ex, echo=_err)
        if outcome.count("done") + outcome.count("skipped"):
            from bench.report import build_report

            build_report(store, out=None, keys={spec.key for spec in specs} | outcome.real_keys, echo=typer.echo)
        if outcome.errors:
            raise typer.Exit(1)


@app.command()
def audit(
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated private methods to audit.")],
    eps: Annotated[str, typer.Option("--eps", help="Comma-separated target ε values, e.g. 1,10.")] = "10",
    dataset: Annotated[str, typer.Option("--dataset", "--datasets", help="Comma-separated datasets.")] = "fmnist",
    canaries: Annotated[int, typer.Option("--canaries", help="m: held-out canaries, each in with prob. 1/2.")] = 1000,
    samples: Annotated[int, typer.Option("--samples", help="Generated samples the black-box score searches.")] = 2000,
    positive_eps: Annotated[
        float, typer.Option("--positive-eps", help="ε of the positive control (the method with its noise all but off).")
    ] = 1000.0,
    canary_kind: Annotated[
        str,
        typer.Option("--canary-kind", help="inverted (held-out, relabelled, 255 − x) | mislabelled (not inverted)."),
    ] = "inverted",
    seeds: Seeds = "0",
    delta: Annotated[float | None, typer.Option("--delta", help="δ (default as bench run).")] = None,
    accountant: Accountant = "rdp",
    profile: Profile = "smoke",
    set_: Sets = None,
    device: Device = "auto",
    results: ResultsDir = Path("results"),
    data_root: DataRoot = None,
    download: Download = False,
    plugin: Plugins = None,
    force: Annotated[bool, typer.Option("--force", help="Recompute finished audits.")] = False,
) -> None:
    """Audit each (method, dataset, ε, seed) with one training run and m canaries (Steinke et al. 2023): an
    empirical ε lower bound at 95%, AUCs, a negative and a positive control, and a verdict (exit 1 on a
    VIOLATION: the lower bound exceeds the ledger's ε)."""
    from bench import audit as audits
    from bench import grid
    from bench.grid.store import Store
    from bench.report import tables

    with user_errors():
        opts = config.GridOptions.parse(methods=methods, eps=eps, dataset=dataset, seeds=seeds, delta=delta,
                                        accountant=accountant, profile=profile, sets=set_, plugins=plugin,
                                        data_root=data_root)  # fmt: skip
        plugins = opts.plugins
        dev = grid.resolve_device(device)
        specs = audits.plan_audits(**opts.plan_args(sweeps=False), canaries=canaries, samples=samples,
                                   positive_epsilon=positive_eps, canary_kind=canary_kind)  # fmt: skip
        store = Store(results)
        r = grid.Runner(store, device=dev, data_root=data_root, download=download, plugins=plugins, force=force,
                          debug=debug())  # fmt: skip
        for ds in dict.fromkeys(s.dataset for s in specs):
            r.dataset(ds, "train"), r.dataset(ds, "test")
        audits.run_audits(r, specs, echo=_err)
        keys = {s.key for s in specs}
        found = [a for a in audits.stored_audits(store) if a["key"] in keys]
        if found:
            typer.echo(tables.markdown(audits.audit_table(found)))
        if r.errors or any(a["verdict"] == "VIOLATION" for a in found):
            raise typer.Exit(1)


@app.command()
def score(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders (results/runs/<key>) to re-score.")],
    metrics: Annotated[str | None, typer.Option("--metrics", help="Comma-separated metrics (default: all).")] = None,
    device: Device = "auto",
    data_root: DataRoot = None,
    inception_weights: InceptionWeights = None,
) -> None:
    """Re-score saved samples.npz of finished runs without retraining (e.g. after new metrics or weights)."""
    from bench import grid
    from bench.grid.store import Store
    from bench.metrics import select_metrics

    with user_errors():
        names = select_metrics(config.parse_list(metrics, "--metrics")) if metrics else None
        _check_weights(inception_weights)
        dev = grid.resolve_device(device)
        for run_dir in run_dirs:
            if not run_dir.is_dir():
                raise BenchError(f"{run_dir} is not a folder")
            store = Store(run_dir.resolve().parent.parent)
            r = grid.Runner(store, device=dev, data_root=data_root, metrics=names, inception_weights=inception_weights)
            scored = r.score(run_dir)
            shown = ", ".join(f"{k}={v.get('value')}" for k, v in scored.items() if names is None or k in names)
            typer.echo(f"{run_dir.name}: {shown}")


@app.command()
def report(
    results: ResultsDir = Path("results"),
    out: Annotated[Path, typer.Option("--out", help="Folder for the tables and plots.")] = Path("reports"),
    format_: Annotated[
        str, typer.Option("--format", help="Comma-separated: md, csv, tex, html (OUT/index.html).")
    ] = "md,csv,tex,html",
    metrics: Annotated[
        str | None, typer.Option("--metrics", help="Comma-separated metrics to report (default: all stored).")
    ] = None,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG and PDF plots to OUT/plots.")] = True,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Rebuild the index from the run folders first.")] = False,
) -> None:
    """Print and write tables method × (dataset, ε), mean ± std over seeds, with the checked ε column,
    a privacy table, a cost table and plots."""
    from bench.grid.store import Store
    from bench.metrics import select_metrics
    from bench.report import FORMATS, build_report
    from bench.report.tables import check_formats

    with user_errors():
        formats = check_formats(config.parse_list(format_, "--format"), FORMATS)
        names = select_metrics(config.parse_list(metrics, "--metrics")) if metrics else None
        if not results.is_dir():
            raise BenchError(f"results folder {results} does not exist (run `bench run` first)")
        store = Store(results)
        if rebuild:
            store.rebuild()
        build_report(store, out=out, keys=None, echo=typer.echo, formats=formats, metrics=names, plots=plots)


@app.command()
def paper(
    paper_id: Annotated[str | None, typer.Argument(help="Paper id, e.g. dpsad-eccv24 (see --list).")] = None,
    list_tables: Annotated[bool, typer.Option("--list", help="List the known paper tables and stop.")] = False,
    profile: Profile = "smoke",
    seeds: Seeds = "0",
    accountant: Accountant = "rdp",
    set_: Sets = None,
    sweep: Sweeps = None,
    device: Device = "auto",
    executor: ExecutorKind = "local",
    ray_address: RayAddress = None,
    gpus_per_run: GpusPerRun = None,
    cpus_per_run: CpusPerRun = 1,
    results: ResultsDir = Path("results"),
    data_root: DataRoot = None,
    download: Download = False,
    plugin: Plugins = None,
    inception_weights: InceptionWeights = None,
    run_cells: Annotated[
        bool, typer.Option("--run", help="Run the cells not finished yet (finished runs are reused).")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the planned grid, run nothing.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Also write the tables here (see --format).")] = None,
    format_: Annotated[str, typer.Option("--format", help="With --out, comma-separated: md, csv, tex.")] = "md,csv,tex",
    estimate: Annotated[
        bool,
        typer.Option(
            "--estimate",
            help="Run nothing: print what each run of the table costs (training units × measured seconds, samples "
            "× seconds per sample) and write it to --out (default reports/).",
        ),
    ] = False,
    throughput: Annotated[
        Path | None,
        typer.Option(
            "--throughput",
            help="With --estimate: the seconds measured by gpu-check (its throughput.json) instead of "
            "timing each config on this device.",
        ),
    ] = None,
) -> None:
    """A paper's table: published values beside ours (mean ± std over seeds) and the difference per cell."""
    from bench import grid
    from bench.grid import paper_plan
    from bench.grid.store import Store
    from bench.report import paper as papers_
    from bench.report.tables import check_formats
    from bench.ui import print_plan

    with user_errors():
        formats = check_formats(config.parse_list(format_, "--format"))
        known = papers_.load_papers()
        published = papers_.load_published(known)
        if list_tables:
            typer.echo(papers_.list_text(known, published))
            return
        if paper_id is None:
            raise BenchError(f"give a paper id or --list; known: {', '.join(known)}")
        chosen = papers_.get_paper(known, paper_id)
        ex, dev = _executor(executor, ray_address, gpus_per_run, cpus_per_run, device)
        opts = config.GridOptions.parse(seeds=seeds, delta=None, accountant=accountant, profile=profile, sets=set_,
                                        sweeps=sweep, plugins=plugin, data_root=data_root)  # fmt: skip
        plugins = opts.plugins
        plan = paper_plan.plan_paper(chosen, known, published, profile=opts.profile, seeds=list(opts.seeds),
                                    accountant=opts.accountant, sets=list(opts.sets), plugins=plugins,
                                    data_root=opts.data_root, sweeps=list(opts.sweeps))  # fmt: skip
        for note in dict.fromkeys(n for spec in plan.specs for n in spec.notes):
            typer.echo(f"warning: {note}", err=True)
        if throughput is not None and not estimate:
            raise BenchError("--throughput goes with --estimate")
        if estimate:
            if run_cells or dry_run:
                raise BenchError("--estimate runs nothing: drop --run / --dry-run")
            _estimate(plan, chosen.id, throughput, dev, out or Path("reports"))
            return
        if dry_run:
            typer.echo(paper_plan.plan_text(plan))
            print_plan(list(plan.specs))
            return
        if not run_cells and not results.is_dir():
            raise BenchError(f"results folder {results} does not exist (run `bench paper {paper_id} --run` first)")
        store = Store(results)
        r = None
        if run_cells and plan.specs:
            _check_weights(inception_weights)
            r = grid.Runner(
                store,
                device=dev,
                data_root=data_root,
                download=download,
                plugins=plugins,
                metrics=plan.run_metrics(),
                inception_weights=inception_weights,
                debug=debug(),
            )
        with ex:
            frame, failed = paper_plan.reproduce(plan, store, r, echo=_err, executor=ex)
        if plan.specs:  # `bench report` shows this paper's table on its HTML page
            papers_.record_run(store, plan, profile=profile, seeds=list(opts.seeds),
                               accountant=accountant, sets=set_ or [], sweeps=sweep or [],
                               plugins=[str(Path(p).resolve()) for p in plugins],
                               data_root=str(Path(data_root).resolve()) if data_root else None)  # fmt: skip
        typer.echo(papers_.to_markdown(plan, frame))
        if out is not None:
            paths = papers_.write_tables(plan, frame, out, formats)
            typer.echo(f"table written to {', '.join(map(str, paths))}", err=True)
        if failed:
            raise typer.Exit(1)


def _estimate(plan: Any, paper_id: str, throughput: Path | None, device: torch.device, out: Path) -> None:
    from bench import estimate as est

    measured = est.load_throughput(throughput) if throughput is not None else None
    frame, used = est.estimate(plan.specs, measured, device=device, metrics=plan.run_metrics(), echo=_err)
    text = est.to_markdown(frame, f"{paper_id}", used.device)
    typer.echo(text)
    paths = est.write(frame, text, out, paper_id)
    typer.echo(f"estimate written to {', '.join(map(str, paths))}", err=True)


@app.command("list")
def list_(plugin: Plugins = None) -> None:
    """Show the registered methods, datasets and profiles."""
    from bench import data
    from bench.grid import registry

    with user_errors():
        reg = registry.methods(tuple(str(p) for p in plugin or ()))
        typer.echo("methods:")
        for name, cls in sorted(reg.items()):
            doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
            caps = (
                f"guarantee={cls.guarantee}, conditional={cls.conditional}, needs_public_data={cls.needs_public_data}"
            )
            typer.echo(f"  {name:<12} {doc[0] if doc else ''}\n  {'':<12} [{caps}]")
        typer.echo("datasets (C×H×W, classes, training records; --data-root DIR or BENCH_DATA for the files):")
        for name in data.DATASETS:
            try:
                d = data.spec(name)
                count = f"{d.num_train:,} train records"
            except BenchError:  # a count read from the dataset's files, which are not here
                d, count = data.spec_without_files(name), "train records counted from its files (not found)"
            typer.echo(f"  {name:<16} {d.channels}×{d.height}×{d.width}, {d.num_classes} classes, {count}")
        typer.echo(f"  {'folder:PATH':<16} your images, one sub-folder per class (options: ?size=32&channels=3&"
                   "test=0.1&seed=0)")  # fmt: skip
        from bench.metrics import METRICS
        from bench.metrics.protocols import PROTOCOLS

        typer.echo("metrics:")
        for name, what in METRICS.items():
            typer.echo(f"  {name:<20} {what}")
        typer.echo("downstream protocols (set one with --set eval.<protocol>.<field>=value; records say `shortened`):")
        for name, p in PROTOCOLS.items():
            typer.echo(f"  {name:<12} {p.title}\n  {'':<12} {p.reference}")
        typer.echo("profiles:")
        for name in config.PROFILES:
            typer.echo(f"  {name}")


INTERRUPTED = "interrupted: rerun the same command to resume from the last checkpoint"


def main(argv: list[str] | None = None) -> None:
    """The `bench` entry point: every error is one line on stderr and a non-zero exit status (2: bad input or
    usage, 1: a cell failed, 3: an internal error, 130: interrupted); --debug shows tracebacks."""
    # typer's bundled click (its exceptions are not re-exported by typer itself)
    from typer._click.exceptions import ClickException, NoArgsIsHelpError

    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    try:
        status = app(argv, standalone_mode=False, prog_name="bench")
    except NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help())
        status = 0
    except ClickException as e:  # a usage error: one line instead of click's usage block
        where = getattr(getattr(e, "ctx", None), "command_path", None)
        typer.echo(f"error: {e.format_message()}" + (f" (see `{where} --help`)" if where else ""), err=True)
        status = e.exit_code
    except (KeyboardInterrupt, typer.Abort):
        status = 130
    except Exception as e:  # noqa: BLE001 - a bug: one line unless --debug
        if debug():
            raise
        typer.echo(
            f"error: internal error: {one_line(e)} (rerun with --debug for the traceback, and please report it)",
            err=True,
        )
        status = 3
    if status == 130:
        typer.echo(INTERRUPTED, err=True)
    sys.exit(status if isinstance(status, int) else 0)
