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
from typing import Annotated, Any

import typer

from bench import config
from bench.allocator import keep_freed_memory
from bench.errors import BenchError, one_line

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


def _err(line: str) -> None:
    typer.echo(line, err=True)


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
    metrics: Annotated[
        str | None,
        typer.Option("--metrics", help="Comma-separated metrics (default: all but the on-request dpimagebench ones)."),
    ] = None,
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
    from bench.grid import commands

    with user_errors():
        opts = config.GridOptions.parse(methods=methods, eps=eps, dataset=dataset, seeds=seeds, delta=delta,
                                        accountant=accountant, profile=profile, sets=set_, sweeps=sweep,
                                        plugins=plugin, data_root=data_root)  # fmt: skip
        execution = commands.Execution(results=results, device=device, executor=executor, ray_address=ray_address,
                                       gpus_per_run=gpus_per_run, cpus_per_run=cpus_per_run, download=download,
                                       inception_weights=inception_weights, force=force, debug=debug())  # fmt: skip
        status = commands.run(opts, execution, metrics=metrics, noise_source=noise_source, real=not no_real,
                              dry_run=dry_run, out=typer.echo, err=_err)  # fmt: skip
    if status:
        raise typer.Exit(status)


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
    from bench.grid import commands

    with user_errors():
        opts = config.GridOptions.parse(methods=methods, eps=eps, dataset=dataset, seeds=seeds, delta=delta,
                                        accountant=accountant, profile=profile, sets=set_, plugins=plugin,
                                        data_root=data_root)  # fmt: skip
        execution = commands.Execution(results=results, device=device, download=download, force=force,
                                       debug=debug())  # fmt: skip
        status = commands.audit(opts, execution, canaries=canaries, samples=samples, positive_epsilon=positive_eps,
                                canary_kind=canary_kind, out=typer.echo, err=_err)  # fmt: skip
    if status:
        raise typer.Exit(status)


@app.command()
def score(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders (results/runs/<key>) to re-score.")],
    metrics: Annotated[
        str | None,
        typer.Option("--metrics", help="Comma-separated metrics (default: all but the on-request dpimagebench ones)."),
    ] = None,
    device: Device = "auto",
    data_root: DataRoot = None,
    inception_weights: InceptionWeights = None,
) -> None:
    """Re-score saved samples.npz of finished runs without retraining (e.g. after new metrics or weights)."""
    from bench.grid import commands

    with user_errors():
        commands.score(run_dirs, metrics=metrics, device=device, data_root=data_root,
                       inception_weights=inception_weights, out=typer.echo)  # fmt: skip


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
    from bench.grid import commands

    with user_errors():
        commands.report(results, out_dir=out, formats=format_, metrics=metrics, plots=plots, rebuild=rebuild,
                        out=typer.echo)  # fmt: skip


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
    from bench.grid import commands

    with user_errors():
        request = commands.PaperRequest(paper_id=paper_id, list_tables=list_tables, run_cells=run_cells,
                                        dry_run=dry_run, out_dir=out, formats=format_, estimate=estimate,
                                        throughput=throughput)  # fmt: skip
        opts = config.GridOptions.parse(seeds=seeds, delta=None, accountant=accountant, profile=profile, sets=set_,
                                        sweeps=sweep, plugins=plugin, data_root=data_root)  # fmt: skip
        execution = commands.Execution(results=results, device=device, executor=executor, ray_address=ray_address,
                                       gpus_per_run=gpus_per_run, cpus_per_run=cpus_per_run, download=download,
                                       inception_weights=inception_weights, debug=debug())  # fmt: skip
        status = commands.paper(request, opts, execution, out=typer.echo, err=_err)
    if status:
        raise typer.Exit(status)


@app.command("list")
def list_(plugin: Plugins = None) -> None:
    """Show the registered methods, datasets and profiles."""
    from bench.grid import commands

    with user_errors():
        commands.list_all(tuple(str(p) for p in plugin or ()), out=typer.echo)


INTERRUPTED = "interrupted: rerun the same command to resume from the last checkpoint"


def main(argv: list[str] | None = None) -> None:
    """The `bench` entry point: every error is one line on stderr and a non-zero exit status (2: bad input or
    usage, 1: a cell failed, 3: an internal error, 130: interrupted); --debug shows tracebacks."""
    # typer's bundled click (its exceptions are not re-exported by typer itself)
    from typer._click.exceptions import ClickException, NoArgsIsHelpError

    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    keep_freed_memory()  # before any tensor: DP steps reuse freed pages (bench.allocator)
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
