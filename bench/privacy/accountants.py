"""ε of composed stages, by one of the accountants behind a registry (ACCOUNTANTS: name -> ε function), and the
check of a ledger against its budget (docs/privacy.md rules 2 and 3).

All give upper bounds on ε, under add/remove-one adjacency:

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
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import rdp_privacy_accountant

from bench.errors import BenchError
from bench.privacy._checks import check_delta
from bench.privacy.ledger import PrivacyLedger, Stage

DEFAULT_ACCOUNTANT = "rdp"
# opacus' DEFAULT_ALPHAS, so that our RDP ε equals what the DP-SGD literature reports.
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
# Width of the PLD's privacy-loss grid. 1e-4 is dp_accounting's default: it reproduces docs/privacy.md's
# PLD column to ~1e-6, so anyone recomputing a card with default settings gets the same ε, at
# 0.1-0.4 s per evaluation of a typical DP-SGD run (2e-4 would halve that but errs by up to 1.6e-3).
PLD_VALUE_DISCRETIZATION = 1e-4


_ADJACENCY = NeighboringRelation.ADD_OR_REMOVE_ONE


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


def epsilon(
    ledger_or_stages: PrivacyLedger | Sequence[Stage], delta: float, accountant: str = DEFAULT_ACCOUNTANT
) -> float:
    """ε at `delta` of all stages composed, measured by `accountant` (a key of ACCOUNTANTS); 0.0 for no stages."""
    stages = _stages(ledger_or_stages)
    delta = check_delta(delta)
    check_accountant(accountant)
    return ACCOUNTANTS[accountant](stages, delta) if stages else 0.0


def _rdp_epsilon(stages: Sequence[Stage], delta: float) -> float:
    return _dp_accounting_epsilon(rdp_privacy_accountant.RdpAccountant(list(RDP_ORDERS), _ADJACENCY), stages, delta)


def _pld_epsilon(stages: Sequence[Stage], delta: float) -> float:
    accountant = pld_privacy_accountant.PLDAccountant(_ADJACENCY, PLD_VALUE_DISCRETIZATION)
    return _dp_accounting_epsilon(accountant, stages, delta)


def _dp_accounting_epsilon(accountant: Any, stages: Sequence[Stage], delta: float) -> float:
    with _quiet_rdp_orders():
        accountant.compose(dp_event.ComposedDpEvent([stage.to_event() for stage in stages]))
    return float(accountant.get_epsilon(delta))


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


# The registry: accountant name -> ε of composed stages at δ (`--accountant` takes its keys).
ACCOUNTANTS: dict[str, Callable[[Sequence[Stage], float], float]] = {
    "rdp": _rdp_epsilon,
    "pld": _pld_epsilon,
    "prv": _prv_epsilon,
}
