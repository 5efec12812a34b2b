"""The budget (ε, δ, accountant) every method of a grid is calibrated to, δ's default (docs/privacy.md rule 1), and
the check of a ledger against its budget (rule 3)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from bench.errors import BenchError
from bench.privacy._checks import _check_num_records, _is_real, check_delta
from bench.privacy.accountants import DEFAULT_ACCOUNTANT, check_accountant, epsilon
from bench.privacy.ledger import PrivacyLedger

# Relative slack of `verify`: absorbs float noise, never a real overshoot.
VERIFY_RTOL = 1e-6


class BudgetExceeded(BenchError):
    """The ε recomputed from a ledger is above the target: the run must not enter a table."""


def default_delta(num_records: int) -> float:
    """docs/privacy.md rule 1: δ = 1e-5 below 100,000 training records, else 10^−(⌊log10 N⌋+1) (1e-6 up to
    999,999 records, 1e-7 up to 9,999,999, ...): always below 1/N."""
    _check_num_records(num_records)
    return min(1e-5, 10.0 ** -(math.floor(math.log10(num_records)) + 1))


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
