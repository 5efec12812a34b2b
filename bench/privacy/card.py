"""The privacy card (privacy.json) of a run and the assumptions every card states (docs/privacy.md)."""

from __future__ import annotations

import math
from typing import Any

from bench.errors import BenchError
from bench.privacy.budget import Budget
from bench.privacy.ledger import ASSUMPTIONS, GUARANTEES, NOISE_ASSUMPTIONS, PrivacyLedger


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


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None
