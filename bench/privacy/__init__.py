"""Privacy: what a method is charged and how it is checked (docs/privacy.md).

    budget.py        Budget (ε, δ, accountant), δ's default, verify: ε from a ledger against its budget
    ledger.py        Stage (one mechanism in dp_accounting's terms) and PrivacyLedger (what a fit applied)
    accountants.py   ACCOUNTANTS, the registry of ε functions (rdp, pld, prv), and epsilon()
    calibration.py   σ for a target ε (calibrate, calibrate_sigma), never undershooting
    card.py          the privacy card (privacy.json) and the assumptions it states
    dpsgd.py         the DP-SGD engine: Poisson sampling, per-example gradients, clipping, noise, the step
    setup.py         one call from (budget, batch size, epochs, N) to a DP-SGD engine and its σ and steps

Everything here is pure accounting over dp_accounting's DpEvents, except dpsgd.py and setup.py, which run it.
The names a method needs are importable from `bench.privacy` itself.
"""

from __future__ import annotations

from bench.privacy._checks import check_delta
from bench.privacy.accountants import (
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    PLD_VALUE_DISCRETIZATION,
    RDP_ORDERS,
    check_accountant,
    epsilon,
)
from bench.privacy.budget import VERIFY_RTOL, Budget, BudgetExceeded, default_delta, verify
from bench.privacy.calibration import SIGMA_MAX, SIGMA_MIN, calibrate, calibrate_sigma
from bench.privacy.card import privacy_card
from bench.privacy.ledger import (
    ASSUMPTIONS,
    CARD_ASSUMPTIONS,
    GUARANTEES,
    MECHANISMS,
    N_DIVIDES_THE_RELEASE,
    NOISE_ASSUMPTIONS,
    Mechanism,
    PrivacyLedger,
    Stage,
)

__all__ = [
    "ACCOUNTANTS",
    "ASSUMPTIONS",
    "CARD_ASSUMPTIONS",
    "DEFAULT_ACCOUNTANT",
    "GUARANTEES",
    "MECHANISMS",
    "NOISE_ASSUMPTIONS",
    "N_DIVIDES_THE_RELEASE",
    "PLD_VALUE_DISCRETIZATION",
    "RDP_ORDERS",
    "SIGMA_MAX",
    "SIGMA_MIN",
    "VERIFY_RTOL",
    "Budget",
    "BudgetExceeded",
    "Mechanism",
    "PrivacyLedger",
    "Stage",
    "calibrate",
    "calibrate_sigma",
    "check_accountant",
    "check_delta",
    "default_delta",
    "epsilon",
    "privacy_card",
    "verify",
]
