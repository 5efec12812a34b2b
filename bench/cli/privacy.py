"""`bench privacy ...`: ε of a DP-SGD run, and σ for a target ε (a thin layer over bench.privacy)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console

from bench import privacy
from bench.errors import BenchError

app = typer.Typer(
    help="Privacy accounting for DP-SGD (Poisson-sampled Gaussian): ε for a σ, or σ for an ε.",
    no_args_is_help=True,
)

SamplingRate = Annotated[float, typer.Option("--sampling-rate", help="Poisson sampling rate q in (0, 1].")]
Steps = Annotated[int, typer.Option("--steps", help="Number of noisy steps (>= 1).")]
Delta = Annotated[float, typer.Option("--delta", help="Target δ in (0, 1).")]
Accountant = Annotated[
    str, typer.Option("--accountant", help=f"One of {', '.join(privacy.ACCOUNTANTS)} (GDP is refused).")
]
AsJson = Annotated[bool, typer.Option("--json", help="End the output with one JSON line.")]


@app.command("epsilon")
def epsilon_command(
    sampling_rate: SamplingRate,
    noise_multiplier: Annotated[
        float, typer.Option("--noise-multiplier", help="σ: noise std relative to the clipping norm (> 0).")
    ],
    steps: Steps,
    delta: Delta,
    accountant: Accountant = privacy.DEFAULT_ACCOUNTANT,
    as_json: AsJson = False,
) -> None:
    """ε of `steps` DP-SGD steps with Poisson sampling rate q and noise multiplier σ."""
    with _user_errors():
        _check_sampling(sampling_rate, steps)
        stage = _dp_sgd_stage(sampling_rate, noise_multiplier, steps)
        eps = privacy.epsilon([stage], delta, accountant)
    if as_json:
        typer.echo(json.dumps({"epsilon": eps if math.isfinite(eps) else None}))
        return
    Console().print(
        f"ε = [bold]{eps:.6g}[/bold]  (δ = {delta:g}, accountant {accountant}; "
        f"q = {sampling_rate:g}, σ = {noise_multiplier:g}, steps = {steps})",
        highlight=False,
        soft_wrap=True,
    )


@app.command("sigma")
def sigma_command(
    epsilon: Annotated[float, typer.Option("--epsilon", help="Target ε (> 0).")],
    sampling_rate: SamplingRate,
    steps: Steps,
    delta: Delta,
    accountant: Accountant = privacy.DEFAULT_ACCOUNTANT,
    as_json: AsJson = False,
) -> None:
    """The smallest σ (noise multiplier) that keeps ε ≤ the target; never undershoots."""
    with _user_errors():
        _check_sampling(sampling_rate, steps)
        sigma = privacy.calibrate_sigma(
            epsilon, sample_rate=sampling_rate, steps=steps, delta=delta, accountant=accountant
        )
        eps = privacy.epsilon([_dp_sgd_stage(sampling_rate, sigma, steps)], delta, accountant)
    if as_json:
        typer.echo(json.dumps({"noise_multiplier": sigma}))
        return
    Console().print(
        # σ in full: a rounded-down σ could overshoot the target.
        f"σ = [bold]{sigma!r}[/bold]  gives ε = {eps:.6g} ≤ {epsilon:g}  (δ = {delta:g}, accountant "
        f"{accountant}; q = {sampling_rate:g}, steps = {steps})",
        highlight=False,
        soft_wrap=True,
    )


def _check_sampling(sampling_rate: float, steps: int) -> None:
    if not 0.0 < sampling_rate <= 1.0:  # also refuses nan
        raise BenchError(f"--sampling-rate must be in (0, 1], got {sampling_rate:g}")
    if steps < 1:
        raise BenchError(f"--steps must be >= 1, got {steps}")


def _dp_sgd_stage(sampling_rate: float, noise_multiplier: float, steps: int) -> privacy.Stage:
    try:
        return privacy.Stage(
            name="dp-sgd",
            mechanism="poisson_gaussian",
            noise_multiplier=noise_multiplier,
            sampling_rate=sampling_rate,
            steps=steps,
        )
    except ValueError as e:  # bad user input here, not a programming error
        raise BenchError(str(e).replace("Stage.noise_multiplier", "--noise-multiplier")) from None


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn a BenchError into one line on stderr and exit status 2, no traceback."""
    try:
        yield
    except BenchError as e:
        message = " ".join(str(e).split())
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2) from None
