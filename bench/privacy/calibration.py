"""σ for a target ε: bisection on the accountant that never undershoots (docs/privacy.md rule 6)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

from bench.errors import BenchError
from bench.privacy._checks import _is_real, check_delta
from bench.privacy.accountants import DEFAULT_ACCOUNTANT, check_accountant, epsilon
from bench.privacy.ledger import Stage

# The bracket calibration searches in; σ outside it is never a sensible DP-SGD setting.
SIGMA_MIN, SIGMA_MAX = 1e-2, 1e4


def calibrate(
    target_epsilon: float,
    make_stages: Callable[[float], list[Stage]],
    delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
    *,
    rtol: float = 1e-4,
    bracket: tuple[float, float] | None = None,
) -> float:
    """The smallest σ (to relative `rtol`) whose stages `make_stages(σ)` give ε ≤ `target_epsilon`.

    Bracketing search on log σ (bisection sped up by false-position steps), assuming ε decreases in
    σ. The returned σ is always the upper end of the bracket, an evaluated point with ε(σ) ≤ target
    (docs/privacy.md rule 6). Stops when the bracket is narrower than `rtol` relative, or ε(σ) is within
    `rtol` of the target. `bracket` is a starting guess (lo, hi), widened as needed within
    [SIGMA_MIN, SIGMA_MAX]; a target that even SIGMA_MAX misses raises BenchError.
    """
    if not _is_real(target_epsilon) or not math.isfinite(target_epsilon) or target_epsilon <= 0:
        raise BenchError(f"target ε must be a finite number > 0, got {target_epsilon!r}")
    delta = check_delta(delta)
    check_accountant(accountant)
    if not 0 < rtol < 1:
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")

    def eps_at(sigma: float) -> float:
        return epsilon(make_stages(sigma), delta, accountant)

    lo, hi = bracket if bracket is not None else (0.5, 1.0)
    lo, hi = max(float(lo), SIGMA_MIN), min(float(hi), SIGMA_MAX)
    if not lo < hi:
        raise ValueError(f"bracket must satisfy lo < hi within [{SIGMA_MIN}, {SIGMA_MAX}], got {bracket!r}")
    eps_lo, eps_hi = math.nan, eps_at(hi)
    while not eps_hi <= target_epsilon:  # also catches nan
        if hi >= SIGMA_MAX:
            raise BenchError(
                f"target ε = {target_epsilon:g} is out of reach at δ = {delta:g} with accountant "
                f"{accountant}: even σ = {SIGMA_MAX:g} gives ε = {eps_hi:.4g}"
            )
        lo, eps_lo = hi, eps_hi
        hi = min(2.0 * hi, SIGMA_MAX)
        eps_hi = eps_at(hi)
    if math.isnan(eps_lo):
        eps_lo = eps_at(lo)
    while eps_lo <= target_epsilon:
        if lo <= SIGMA_MIN:
            return lo  # already within budget at the smallest σ considered
        hi, eps_hi = lo, eps_lo
        lo = max(lo / 2.0, SIGMA_MIN)
        eps_lo = eps_at(lo)

    # Invariant: ε(lo) > target ≥ ε(hi). The trial point is the Illinois false-position guess on
    # g(x) = log(ε / target) against x = log σ (the residual of an end kept twice in a row is halved,
    # which prevents one-sided convergence), or the geometric midpoint when the guess is unusable or
    # two steps failed to halve the bracket. The bracket only shrinks and `hi` is always an evaluated
    # point within budget.
    g_lo, g_hi = _log_ratio(eps_lo, target_epsilon), _log_ratio(eps_hi, target_epsilon)
    kept, widths = "", [math.inf, math.inf]  # bracket widths (log σ) before the last two steps
    while hi - lo > rtol * hi and target_epsilon - eps_hi > rtol * target_epsilon:
        x_lo, x_hi = math.log(lo), math.log(hi)
        mid = math.exp(x_lo + g_lo * (x_hi - x_lo) / (g_lo - g_hi))
        if math.log(hi / lo) > widths[0] / 2 or not lo * (1 + rtol / 4) < mid < hi * (1 - rtol / 4):
            mid = math.sqrt(lo * hi)
        eps_mid = eps_at(mid)
        g_mid = _log_ratio(eps_mid, target_epsilon)
        widths = [widths[1], math.log(hi / lo)]
        if eps_mid <= target_epsilon:
            hi, eps_hi, g_hi = mid, eps_mid, g_mid
            g_lo = g_lo / 2 if kept == "lo" else g_lo
            kept = "lo"
        else:
            lo, eps_lo, g_lo = mid, eps_mid, g_mid
            g_hi = g_hi / 2 if kept == "hi" else g_hi
            kept = "hi"
    return hi


def _log_ratio(eps: float, target: float) -> float:
    """log(ε / target), clipped to ±50 so that ε = 0 or inf stay usable in the interpolation."""
    if math.isnan(eps):
        return 50.0
    return min(50.0, max(-50.0, math.log(max(eps, 1e-300) / target)))


def calibrate_sigma(
    target_epsilon: float,
    *,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = DEFAULT_ACCOUNTANT,
    rtol: float = 1e-4,
) -> float:
    """σ for DP-SGD with Poisson sampling rate `sample_rate` and `steps` steps to reach ε ≤ target.

    For pld and prv the search starts from the (fast) RDP σ, which is close above the answer.
    """
    if not _is_real(sample_rate) or not 0.0 < sample_rate <= 1.0:
        raise BenchError(f"sampling rate q must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise BenchError(f"steps must be an integer >= 1, got {steps!r}")
    check_accountant(accountant)

    def make_stages(sigma: float) -> list[Stage]:
        stage = Stage(
            name="dp-sgd",
            mechanism="poisson_gaussian",
            noise_multiplier=sigma,
            sampling_rate=sample_rate,
            steps=int(steps),
        )
        return [stage]

    bracket = None
    if accountant != "rdp":
        sigma_rdp = calibrate(target_epsilon, make_stages, delta, "rdp", rtol=rtol)
        bracket = (0.9 * sigma_rdp, sigma_rdp)
    return calibrate(target_epsilon, make_stages, delta, accountant, rtol=rtol, bracket=bracket)
