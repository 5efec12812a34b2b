"""What a method applied to private data: its stages (mechanisms in dp_accounting's terms) and the ledger of them
(docs/privacy.md rules 3 and 5)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal

from dp_accounting import dp_event

from bench.privacy._checks import _is_real

Mechanism = Literal["poisson_gaussian", "gaussian", "laplace"]
MECHANISMS: tuple[str, ...] = ("poisson_gaussian", "gaussian", "laplace")
GUARANTEES: tuple[str, ...] = ("end-to-end", "partial", "none")

# The assumptions every privacy card states (bench.privacy.card); a method adds its own with `ledger.assume`.
ASSUMPTIONS = (
    "adjacency: data sets that differ by adding or removing one record (the accountants' add/remove model)",
    "the record count N is public (the usual convention): the sampling rate q = B/N, the expected batch size "
    "q·N that divides each noisy gradient sum, and δ's default (1e-5 below 100,000 records, else "
    "10^−(⌊log10 N⌋+1), always below 1/N) use it",
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
