"""The contract suite: every registered method, built through the registry, on tiny CPU settings.

No per-method branches: a new method passes by adding its tiny settings to tests/profiles/tiny.toml.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from bench import config, registry
from bench.contract import NullProgress
from bench.privacy import Budget, PrivacyLedger, epsilon
from tests.conftest import TINY_PROFILE

METHODS = sorted(registry.methods())
CPU = torch.device("cpu")
EPS = 10.0


def build(name: str, train):
    cls = registry.get(name)
    cfg, _ = config.resolve(
        cls.Config,
        profile=config.load_profile(TINY_PROFILE),
        method=name,
        dataset="synthetic",
        epsilon=EPS,
        sets={},
    )
    return cls(cfg, spec=train.spec, device=CPU)


def labels_for(method, n: int, num_classes: int):
    return torch.arange(n) % num_classes if method.conditional else None


@pytest.fixture(scope="module", params=METHODS)
def fitted(request, train):
    method = build(request.param, train)
    budget = Budget.for_records(EPS, len(train))
    ledger = method.fit(train, budget=budget, generator=torch.Generator().manual_seed(0), progress=NullProgress())
    return request.param, method, ledger, budget


def test_fit_returns_a_ledger_within_budget(fitted) -> None:
    name, method, ledger, budget = fitted
    assert isinstance(ledger, PrivacyLedger)
    if method.guarantee == "none":
        assert ledger.non_private, f"{name}: a non-private method must say why in its ledger"
    else:
        eps = epsilon(ledger, budget.delta, budget.accountant)
        assert 0 < eps <= EPS * (1 + 1e-6)
        assert math.isfinite(eps)


def test_sample_shape_dtype_range(fitted, train) -> None:
    name, method, _, _ = fitted
    n = 2 * train.num_classes
    x = method.sample(n, labels=labels_for(method, n, train.num_classes), generator=torch.Generator().manual_seed(1))
    assert x.dtype == torch.uint8
    assert tuple(x.shape) == (n, *train.images.shape[1:])
    assert x.float().std() > 0, f"{name}: constant samples"


def test_same_seed_same_samples(fitted, train) -> None:
    _, method, _, _ = fitted
    n = train.num_classes
    labels = labels_for(method, n, train.num_classes)
    a = method.sample(n, labels=labels, generator=torch.Generator().manual_seed(3))
    b = method.sample(n, labels=labels, generator=torch.Generator().manual_seed(3))
    c = method.sample(n, labels=labels, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_save_load_round_trip(fitted, train, tmp_path) -> None:
    name, method, _, _ = fitted
    path = tmp_path / "state.pt"
    torch.save(method.state_dict(), path)
    fresh = build(name, train)
    fresh.load_state_dict(torch.load(path, weights_only=False))
    n = train.num_classes
    labels = labels_for(method, n, train.num_classes)
    a = method.sample(n, labels=labels, generator=torch.Generator().manual_seed(5))
    b = fresh.sample(n, labels=labels, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


class Midway(NullProgress):
    """A Progress that keeps (a copy of) the state of the first checkpoint at or after half the fit's units, as
    an interrupted run's checkpoint file would, and resumes from `state` when given."""

    def __init__(self, state: dict | None = None) -> None:
        self.total = self.done = 0
        self.saved, self.state = None, state

    def start(self, total: int, description: str = "") -> None:
        self.total = total

    def advance(self, n: int = 1) -> None:
        self.done += n

    def resume(self) -> dict | None:
        return self.state

    def checkpoint(self, state_fn) -> None:
        if self.saved is None and self.state is None and self.done >= max(1, self.total // 2):
            buffer = io.BytesIO()
            torch.save(state_fn(), buffer)  # a copy, as on disk
            self.saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)


def test_same_fit_seed_same_model_and_a_resumed_fit_ends_where_it_would_have(fitted, train) -> None:
    """The same seed gives the same model; a fit resumed from a mid-fit checkpoint under ANOTHER seed ends with
    that model and that ledger too (so a resume that ignored its checkpoint, or restored only part of the state,
    would fail: a fresh fit with seed 7 gives another model, checked last)."""
    name, method, ledger, budget = fitted
    again, midway = build(name, train), Midway()
    again.fit(train, budget=budget, generator=torch.Generator().manual_seed(0), progress=midway)
    n = train.num_classes
    labels = labels_for(method, n, train.num_classes)

    def samples(m) -> torch.Tensor:
        return m.sample(n, labels=labels, generator=torch.Generator().manual_seed(6))

    assert torch.equal(samples(method), samples(again))
    assert midway.saved is not None, f"{name}: no checkpoint offered in the second half of its fit"
    resumed = build(name, train)
    resumed_ledger = resumed.fit(
        train, budget=budget, generator=torch.Generator().manual_seed(7), progress=Midway(midway.saved)
    )
    assert torch.equal(samples(resumed), samples(method)), f"{name}: the resumed fit ended elsewhere"
    assert resumed_ledger.stages == ledger.stages, f"{name}: the resumed fit charged other stages"
    other = build(name, train)
    other.fit(train, budget=budget, generator=torch.Generator().manual_seed(7), progress=NullProgress())
    assert not torch.equal(samples(other), samples(method)), f"{name}: seed 7 gives the same model as seed 0"
