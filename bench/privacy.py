"""Privacy accounting: budgets, the ledger of mechanisms a method applied, ε, calibration, the card.

Everything here is pure accounting maths over dp_accounting's DpEvents (the README's privacy sections give the rules):

- DP-SGD step (Abadi et al. 2016, Alg. 1): `SelfComposed(PoissonSampled(q, Gaussian(σ)), steps)`;
- Gaussian mechanism (σ relative to L2 sensitivity) and Laplace mechanism (scale b relative to L1
  sensitivity), each composed `count` times;
- stages compose (adaptive composition): `Composed([...])`.

Accountants (all give upper bounds on ε, under add/remove-one adjacency):

- "rdp": Rényi DP (Mironov 2017; subsampled Gaussian: Mironov, Talwar, Zhang 2019) with opacus'
  default orders, converted to (ε, δ) by dp_accounting. For fractional orders dp_accounting sums the
  absolute values of the series terms, a slightly looser bound than opacus' signed sum (ε higher by a
  relative ~3e-5 at q = 0.04, σ = 1.5, 2250 steps);
- "pld": privacy loss distributions (Koskela et al. 2020; Doroshenko et al. 2022), pessimistic
  discretisation, so the result stays an upper bound;
- "prv": privacy random variables (Gopi, Lee, Wutschitz 2021) through opacus; Gaussian stages only
  (Poisson-sampled, and plain Gaussian releases as q = 1). Its ε is the upper end of the numerical error
  bracket.

GDP (Dong, Roth, Su 2019) is refused: its CLT-based ε is an approximation, not an upper bound.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import rdp_privacy_accountant

from bench.errors import BenchError

ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld", "prv")
DEFAULT_ACCOUNTANT = "rdp"
Mechanism = Literal["poisson_gaussian", "gaussian", "laplace"]
MECHANISMS: tuple[str, ...] = ("poisson_gaussian", "gaussian", "laplace")
GUARANTEES: tuple[str, ...] = ("end-to-end", "partial", "none")

# opacus' DEFAULT_ALPHAS, so that our RDP ε equals what the DP-SGD literature reports.
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
# Width of the PLD's privacy-loss grid. 1e-4 is dp_accounting's default: it reproduces docs/privacy.md's
# PLD column to ~1e-6, so anyone recomputing a card with default settings gets the same ε, at
# 0.1-0.4 s per evaluation of a typical DP-SGD run (2e-4 would halve that but errs by up to 1.6e-3).
PLD_VALUE_DISCRETIZATION = 1e-4
# Relative slack of `verify`: absorbs float noise, never a real overshoot.
VERIFY_RTOL = 1e-6
# The bracket calibration searches in; σ outside it is never a sensible DP-SGD setting.
SIGMA_MIN, SIGMA_MAX = 1e-2, 1e4

_ADJACENCY = NeighboringRelation.ADD_OR_REMOVE_ONE


class BudgetExceeded(BenchError):
    """The ε recomputed from a ledger is above the target: the run must not enter a table."""


def check_accountant(accountant: str) -> str:
    """Return `accountant` if it is one of ACCOUNTANTS, else raise BenchError (GDP included)."""
    if accountant in ACCOUNTANTS:
        return accountant
    if isinstance(accountant, str) and accountant.lower() == "gdp":
        raise BenchError(
            "accountant 'gdp' is refused: GDP's ε is an approximation, not an upper bound; "
            f"choose one of {', '.join(ACCOUNTANTS)}"
        )
    raise BenchError(f"unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")


def check_delta(delta: float) -> float:
    """Return δ as a float if 0 < δ < 1, else raise BenchError."""
    if not _is_real(delta) or not 0.0 < float(delta) < 1.0:
        raise BenchError(f"δ must be a number in (0, 1), got {delta!r}")
    return float(delta)


def default_delta(num_records: int) -> float:
    """docs/privacy.md rule 1: δ = 1e-5 below 100,000 training records, else 10^−(⌊log10 N⌋+1) (1e-6 up to
    999,999 records, 1e-7 up to 9,999,999, ...): always below 1/N."""
    _check_num_records(num_records)
    return min(1e-5, 10.0 ** -(math.floor(math.log10(num_records)) + 1))


# --------------------------------------------------------------------------------------------- budget


@dataclass(frozen=True, kw_only=True)
class Budget:
    """The (ε, δ) every method of a grid is calibrated to, and the accountant that measures it.

    `Budget.unlimited(delta)` is the one way to get ε = inf: the budget of a non-private reference
    method (its card has guarantee "none" and ε null). `dataclasses.replace` on it raises.
    """

    epsilon: float  # target ε, finite and > 0
    delta: float  # target δ in (0, 1); see `for_records` for the δ < 1/N rule
    accountant: str = DEFAULT_ACCOUNTANT  # one of ACCOUNTANTS

    def __post_init__(self) -> None:
        if not _is_real(self.epsilon) or not math.isfinite(self.epsilon) or self.epsilon <= 0:
            raise BenchError(f"ε must be a finite number > 0, got {self.epsilon!r}")
        object.__setattr__(self, "epsilon", float(self.epsilon))
        _check_delta_and_accountant(self)

    @classmethod
    def for_records(
        cls,
        epsilon: float,
        num_records: int,
        delta: float | None = None,
        accountant: str = DEFAULT_ACCOUNTANT,
    ) -> Budget:
        """The budget for a training set of `num_records` records: default δ by docs/privacy.md rule 1,
        and δ ≥ 1/N refused (such a δ allows publishing a record outright)."""
        _check_num_records(num_records)
        if delta is None:
            delta = default_delta(num_records)
        budget = cls(epsilon=epsilon, delta=delta, accountant=accountant)
        if budget.delta >= 1.0 / num_records:
            raise BenchError(
                f"δ = {budget.delta:g} is not below 1/N = {1.0 / num_records:.3g} for N = {num_records} "
                "records; pass a smaller δ"
            )
        return budget

    @classmethod
    def unlimited(cls, delta: float, accountant: str = DEFAULT_ACCOUNTANT) -> Budget:
        """ε = inf: the budget handed to a non-private method (guarantee "none")."""
        budget = object.__new__(cls)
        object.__setattr__(budget, "epsilon", math.inf)
        object.__setattr__(budget, "delta", delta)
        object.__setattr__(budget, "accountant", accountant)
        _check_delta_and_accountant(budget)
        return budget

    @property
    def is_unlimited(self) -> bool:
        return math.isinf(self.epsilon)


def _check_delta_and_accountant(budget: Budget) -> None:
    object.__setattr__(budget, "delta", check_delta(budget.delta))
    check_accountant(budget.accountant)


# ---------------------------------------------------------------------------------------------- stage


@dataclass(frozen=True, kw_only=True)
class Stage:
    """One mechanism applied to private data, as charged; its dict form is a card's stage entry."""

    name: str  # e.g. "student", "votes"
    mechanism: Mechanism
    noise_multiplier: float  # σ / sensitivity (Gaussian, L2) or Laplace scale b / L1 sensitivity
    sampling_rate: float | None = None  # q of Poisson sampling; poisson_gaussian only
    steps: int = 0  # noisy steps taken; poisson_gaussian only
    count: int = 0  # number of compositions; gaussian and laplace only
    max_grad_norm: float | None = None  # clipping bound C (informational: σ is already relative to it)
    expected_batch_size: float | None = None  # q · N; poisson_gaussian only, informational
    sensitivity: str = ""  # what σ is relative to, and under which adjacency, where it is not obvious

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Stage.name must be a non-empty string, got {self.name!r}")
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"Stage.mechanism must be one of {MECHANISMS}, got {self.mechanism!r}")
        self._set_positive("noise_multiplier")
        sampled = self.mechanism == "poisson_gaussian"
        if sampled:
            q = self._set_positive("sampling_rate")
            if q > 1.0:
                raise ValueError(f"Stage.sampling_rate must be in (0, 1], got {q!r}")
            self._set_count("steps", required=True)
            self._set_count("count", required=False)
            if self.expected_batch_size is not None:
                self._set_positive("expected_batch_size")
        else:
            for key in ("sampling_rate", "expected_batch_size"):
                if getattr(self, key) is not None:
                    raise ValueError(f"Stage.{key} applies to poisson_gaussian only, got {getattr(self, key)!r}")
            self._set_count("count", required=True)
            self._set_count("steps", required=False)
        if self.max_grad_norm is not None:
            self._set_positive("max_grad_norm")

    def _set_positive(self, key: str) -> float:
        value = getattr(self, key)
        if not _is_real(value) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"Stage.{key} must be a finite number > 0, got {value!r}")
        object.__setattr__(self, key, float(value))
        return float(value)

    def _set_count(self, key: str, *, required: bool) -> None:
        value = getattr(self, key)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"Stage.{key} must be an integer, got {value!r}")
        if required and value < 1:
            raise ValueError(f"Stage.{key} must be >= 1 for {self.mechanism}, got {value!r}")
        if not required and value != 0:
            raise ValueError(f"Stage.{key} does not apply to {self.mechanism}, got {value!r}")
        object.__setattr__(self, key, int(value))

    def to_event(self) -> dp_event.DpEvent:
        """The dp_accounting event this stage charges."""
        sigma = self.noise_multiplier
        if self.mechanism == "poisson_gaussian":
            # DP-SGD, Abadi et al. 2016, Alg. 1: each step is a Gaussian on a Poisson sample.
            step = dp_event.PoissonSampledDpEvent(self.sampling_rate, dp_event.GaussianDpEvent(sigma))
            return dp_event.SelfComposedDpEvent(step, self.steps)
        if self.mechanism == "gaussian":
            return dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(sigma), self.count)
        return dp_event.SelfComposedDpEvent(dp_event.LaplaceDpEvent(sigma), self.count)

    def to_dict(self) -> dict[str, Any]:
        """The card's stage entry (docs/privacy.md key names); keys that do not apply are omitted."""
        out: dict[str, Any] = {"name": self.name, "mechanism": self.mechanism}
        if self.mechanism == "poisson_gaussian":
            out["sampling_rate"] = self.sampling_rate
        out["noise_multiplier"] = self.noise_multiplier
        if self.mechanism == "poisson_gaussian":
            out["steps"] = self.steps
        else:
            out["count"] = self.count
        for key in ("max_grad_norm", "expected_batch_size"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.sensitivity:
            out["sensitivity"] = self.sensitivity
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stage:
        unknown = set(data) - _STAGE_KEYS
        if unknown:
            raise ValueError(f"unknown stage keys {sorted(unknown)}; valid keys are {sorted(_STAGE_KEYS)}")
        return cls(**data)


_STAGE_KEYS = {
    "name",
    "mechanism",
    "noise_multiplier",
    "sampling_rate",
    "steps",
    "count",
    "max_grad_norm",
    "expected_batch_size",
    "sensitivity",
}


# --------------------------------------------------------------------------------------------- ledger


@dataclass(kw_only=True)
class PrivacyLedger:
    """Every mechanism a method applied to private data (docs/privacy.md rules 3 and 5).

    The harness recomputes ε from `stages`; anything that touched private data outside a DP mechanism
    is listed in `non_private`, which makes the guarantee "partial".
    """

    stages: list[Stage] = field(default_factory=list)
    non_private: list[str] = field(default_factory=list)  # reasons, one per non-private access
    claimed_epsilon: float | None = None  # the method's own analysis, when it differs from ours
    assumptions: list[str] = field(default_factory=list)  # the method's own, added to the card's (ASSUMPTIONS)

    def add(self, stage: Stage) -> Stage:
        if not isinstance(stage, Stage):
            raise TypeError(f"PrivacyLedger.add takes a Stage, got {type(stage).__name__}")
        self.stages.append(stage)
        return stage

    def mark_non_private(self, reason: str) -> None:
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError(f"a non-private access needs a reason, got {reason!r}")
        if reason not in self.non_private:  # a resumed fit may declare the same access again
            self.non_private.append(reason)

    def assume(self, assumption: str) -> None:
        """State an assumption the guarantee rests on, beyond those every card lists (ASSUMPTIONS)."""
        if not isinstance(assumption, str) or not assumption.strip():
            raise ValueError(f"an assumption needs a text, got {assumption!r}")
        if assumption not in self.assumptions:  # a resumed fit may state it again
            self.assumptions.append(assumption)

    def event(self) -> dp_event.DpEvent:
        """All stages composed, in the order they were applied."""
        if not self.stages:
            return dp_event.NoOpDpEvent()
        return dp_event.ComposedDpEvent([stage.to_event() for stage in self.stages])

    @property
    def guarantee(self) -> Literal["end-to-end", "partial"]:
        return "partial" if self.non_private else "end-to-end"

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": [stage.to_dict() for stage in self.stages],
            "non_private": list(self.non_private),
            "claimed_epsilon": self.claimed_epsilon,
            "assumptions": list(self.assumptions),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyLedger:
        """Inverse of `to_dict`; also reads a privacy card (its other keys are ignored)."""
        claimed = data.get("claimed_epsilon")
        return cls(
            stages=[Stage.from_dict(stage) for stage in data.get("stages", [])],
            non_private=[str(reason) for reason in data.get("non_private", [])],
            claimed_epsilon=None if claimed is None else float(claimed),
            # a card's assumptions hold the common ones too: only the method's own go back into the ledger
            assumptions=[str(a) for a in data.get("assumptions", []) if a not in CARD_ASSUMPTIONS],
        )


# ------------------------------------------------------------------------------------------------- ε


def epsilon(
    ledger_or_stages: PrivacyLedger | Sequence[Stage], delta: float, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
    """ε at `delta` of all stages composed, measured by `accountant`; 0.0 for no stages."""
    stages = _stages(ledger_or_stages)
    delta = check_delta(delta)
    check_accountant(accountant)
    if not stages:
        return 0.0
    if accountant == "prv":
        return _prv_epsilon(stages, delta)
    if accountant == "rdp":
        acc = rdp_privacy_accountant.RdpAccountant(list(RDP_ORDERS), _ADJACENCY)
    else:
        acc = pld_privacy_accountant.PLDAccountant(_ADJACENCY, PLD_VALUE_DISCRETIZATION)
    with _quiet_rdp_orders():
        acc.compose(dp_event.ComposedDpEvent([stage.to_event() for stage in stages]))
    return float(acc.get_epsilon(delta))


class _DropOrderWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Excluding this order" not in record.getMessage()


_ORDER_FILTER = _DropOrderWarnings()


@contextmanager
def _quiet_rdp_orders() -> Iterator[None]:
    """Mute dp_accounting's warning about an RDP order whose series fails to converge (small σ, small
    orders): that order is excluded from the minimum over orders, so ε stays an upper bound."""
    logger = logging.getLogger("absl")
    logger.addFilter(_ORDER_FILTER)
    try:
        yield
    finally:
        logger.removeFilter(_ORDER_FILTER)


def _prv_epsilon(stages: Sequence[Stage], delta: float) -> float:
    """opacus' PRV accountant (eps_error 0.01, delta_error δ/1000), one history entry per stage."""
    from opacus.accountants import PRVAccountant  # imports torch: only when prv is asked for

    for stage in stages:
        if stage.mechanism == "laplace":
            raise BenchError(
                f"accountant 'prv' supports Gaussian stages only; stage {stage.name!r} is laplace: use rdp or pld"
            )
    acc = PRVAccountant()
    # a plain Gaussian release is the Poisson-subsampled Gaussian with q = 1, composed `count` times
    acc.history = [
        (s.noise_multiplier, s.sampling_rate, s.steps) if s.mechanism == "poisson_gaussian"
        else (s.noise_multiplier, 1.0, s.count)
        for s in stages
    ]  # fmt: skip
    with np.errstate(divide="ignore"), warnings.catch_warnings():  # log(1 - q) at q = 1 is harmless
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(acc.get_epsilon(delta))


def _stages(ledger_or_stages: PrivacyLedger | Sequence[Stage]) -> list[Stage]:
    if isinstance(ledger_or_stages, PrivacyLedger):
        return list(ledger_or_stages.stages)
    stages = list(ledger_or_stages)
    for stage in stages:
        if not isinstance(stage, Stage):
            raise TypeError(f"expected a PrivacyLedger or Stages, got {type(stage).__name__}")
    return stages


def verify(ledger: PrivacyLedger, budget: Budget) -> float:
    """Recompute ε from the ledger with the budget's accountant and δ (docs/privacy.md rule 3).

    Returns ε; raises BudgetExceeded when ε > target · (1 + 1e-6), and BenchError for an empty ledger (a private
    method that records no mechanism would read ε = 0).
    """
    if not ledger.stages:
        raise BenchError(
            "the method's ledger is empty: a private method must record every mechanism it applies to the "
            "training data (an empty ledger would read ε = 0); declare guarantee 'none' if it is not private"
        )
    eps = epsilon(ledger, budget.delta, budget.accountant)
    if math.isnan(eps) or eps > budget.epsilon * (1.0 + VERIFY_RTOL):
        raise BudgetExceeded(
            f"ε = {eps:.6g} exceeds the target ε = {budget.epsilon:g} "
            f"(δ = {budget.delta:g}, accountant {budget.accountant})"
        )
    return eps


# ---------------------------------------------------------------------------------------- calibration


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


# ----------------------------------------------------------------------------------------------- card


ASSUMPTIONS = (
    "adjacency: data sets that differ by adding or removing one record (the accountants' add/remove model)",
    "the record count N is public (the usual convention): the sampling rate q = B/N, the expected batch size "
    "q·N that divides each noisy gradient sum, and δ's default (1e-5 below 100,000 records, else 1e-6) use it",
)

# where the DP noise comes from (`bench run --noise-source`): the card states the one that ran
NOISE_ASSUMPTIONS = {
    "seed": "the run's seed (config.json) and its folder (checkpoints, logs) are not part of the release: the DP "
    "noise and the batch sampling are drawn from generators seeded by the run's seed, so whoever holds the seed "
    "and the code can recompute them; publish the released model or samples only (`--noise-source os` draws them "
    "from OS entropy instead)",
    "os": "the DP noise, the batch sampling and the initial weights are drawn from a generator seeded with 63 bits "
    "of OS entropy that is never written (`--noise-source os`: the run is not bit-reproducible); the folder is "
    "still not part of the release: an unfinished fit's training checkpoint holds the generators' state. The "
    "generator is torch's Mersenne Twister, not a cryptographically secure one, and the floating-point Gaussian "
    "is not hardened against Mironov's (2012) attack",
}


CARD_ASSUMPTIONS = frozenset((*ASSUMPTIONS, *NOISE_ASSUMPTIONS.values()))  # every card's, not a method's own

# a kernel method's own assumption (DP-MERF, DP-HP): N is used beyond DP-SGD's uses in ASSUMPTIONS
N_DIVIDES_THE_RELEASE = (
    "the record count N is public here too: the noisy embedding sum is divided by N (a mean) and N sets the "
    "generator's steps per epoch"
)


def privacy_card(
    ledger: PrivacyLedger, budget: Budget, *, epsilon: float, guarantee: str, noise_source: str = "seed"
) -> dict[str, Any]:
    """The privacy card (privacy.json) of a run; JSON-ready, with ε = inf written as None (null).

    `guarantee` is the method's declared guarantee, possibly weakened by the ledger: a ledger with
    non-private accesses can never be printed as "end-to-end". A method declaring "none" (no DP at
    all) gets ε null whatever its ledger holds.
    """
    if guarantee not in GUARANTEES:
        raise BenchError(f"guarantee must be one of {GUARANTEES}, got {guarantee!r}")
    if guarantee == "end-to-end" and ledger.non_private:
        raise BenchError(
            "guarantee 'end-to-end' with non-private accesses in the ledger: "
            f"{'; '.join(ledger.non_private)}; it must be 'partial'"
        )
    if guarantee == "none":
        epsilon = math.inf
    return {
        "target_epsilon": _finite_or_none(budget.epsilon),
        "delta": budget.delta,
        "accountant": budget.accountant,
        "epsilon": _finite_or_none(epsilon),
        "guarantee": guarantee,
        "non_private": list(ledger.non_private),
        "claimed_epsilon": ledger.claimed_epsilon,
        "stages": [stage.to_dict() for stage in ledger.stages],
        "noise_source": noise_source,
        "assumptions": [*ASSUMPTIONS, NOISE_ASSUMPTIONS[noise_source], *ledger.assumptions],
    }


# -------------------------------------------------------------------------------------------- helpers


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and not math.isnan(x)


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _check_num_records(num_records: int) -> None:
    if isinstance(num_records, bool) or not isinstance(num_records, numbers.Integral) or num_records < 1:
        raise BenchError(f"the number of training records must be an integer >= 1, got {num_records!r}")
