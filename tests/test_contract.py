"""The contract suite: every registered method, built through the registry, on tiny CPU settings, on the
1×16×16 procedural set and on its 3×32×32 colour version (CIFAR-10's shape).

No per-method branches: a new method passes by adding its tiny settings to tests/profiles/tiny.toml (and a
[method.synthetic-rgb32] table where the shape needs other ones).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from bench import config, data
from bench.contract import ImageDataset, NullProgress
from bench.grid import curve, registry
from bench.grid.store import load_torch
from bench.privacy import Budget, PrivacyLedger, dpsgd, epsilon
from tests.conftest import TINY_PROFILE, InterruptAt

METHODS = sorted(registry.methods())
DATASETS = ("synthetic", "synthetic-rgb32")  # 1×16×16 and 3×32×32
CPU = torch.device("cpu")
EPS = 10.0


@pytest.fixture(scope="module", params=DATASETS)
def train(request) -> ImageDataset:
    """The training split the methods are fitted on (shadows conftest's 1×16×16 one in this module)."""
    return data.load(request.param, "train")


def build(name: str, train: ImageDataset):
    """The method through the registry, with the tiny profile's settings for `train`'s dataset."""
    cls = registry.get(name)
    cfg, _ = config.resolve(
        cls.Config,
        profile=config.load_profile(TINY_PROFILE),
        method=name,
        dataset=train.name,
        epsilon=EPS,
        sets={},
    )
    return cls(cfg, spec=train.spec, device=CPU)


def labels_for(method, n: int, num_classes: int):
    return torch.arange(n) % num_classes if method.conditional else None


class Spy:
    """What the shared DP-SGD code actually does during a fit: per DPSGD engine, its σ, C, q, the batch size of
    every step and the noise it drew (sum of squares, count, the std it was asked for); per Poisson sampler,
    its N, q and batch sizes. Installed around the shared code (DPSGD._release, add_noise, PoissonSampler), so it
    sees every DP-SGD method without a line of per-method code."""

    def __init__(self) -> None:
        self.engines: dict[int, dict] = {}
        self.samplers: list[dict] = []
        self.current: dict | None = None

    @contextlib.contextmanager
    def installed(self):
        step, noise, draw = dpsgd.DPSGD._release, dpsgd.add_noise, dpsgd.PoissonSampler.__iter__

        def spy_step(engine, B, clipped_sum):  # every noisy step (step and step_outputs) goes through _release
            self.current = self.engines.setdefault(id(engine), {
                "sigma": engine.noise_multiplier, "C": engine.max_grad_norm, "q": engine.sample_rate,
                "expected": engine.expected_batch_size, "B": [], "noise": [],
            })  # fmt: skip
            self.current["B"].append(int(B))
            try:
                return step(engine, B, clipped_sum)
            finally:
                self.current = None

        def spy_noise(sums, *, noise_std, generator):
            out = noise(sums, noise_std=noise_std, generator=generator)
            if self.current is not None:
                drawn = torch.cat([(o - s).detach().flatten().double() for o, s in zip(out, sums, strict=True)])
                self.current["noise"].append((drawn.pow(2).sum().item(), drawn.numel(), noise_std))
            return out

        def spy_draw(sampler):
            record = {"N": sampler.num_records, "q": sampler.sample_rate, "B": []}
            self.samplers.append(record)
            for index in draw(sampler):
                record["B"].append(len(index))
                yield index

        dpsgd.DPSGD._release, dpsgd.add_noise, dpsgd.PoissonSampler.__iter__ = spy_step, spy_noise, spy_draw
        try:
            yield self
        finally:
            dpsgd.DPSGD._release, dpsgd.add_noise, dpsgd.PoissonSampler.__iter__ = step, noise, draw


# (method, stage): a Poisson-subsampled Gaussian mechanism that is not a DP-SGD step (no clipping, no DPSGD engine);
# its noise against the ledger is checked in the method's own tests (tests/test_dpkernel.py)
NOT_DP_SGD = {("dpkernel", "embedding")}


@pytest.fixture(scope="module", params=METHODS)
def fitted(request, train):
    method = build(request.param, train)
    budget = Budget.for_records(EPS, len(train))
    with Spy().installed() as spy:
        ledger = method.fit(train, budget=budget, generator=torch.Generator().manual_seed(0), progress=NullProgress())
    method.spy = spy
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


def test_every_dp_sgd_step_draws_the_noise_and_batches_the_ledger_charges(fitted, train) -> None:
    """Each poisson_gaussian stage of the ledger is one DPSGD engine that ran: the same σ, C and q, exactly
    `steps` noisy steps, noise of std σ·C on every coordinate of every step (empirical, within 3%), batches from
    a Poisson sampler over the N training records at rate q whose mean size is q·N (within 5 standard errors),
    and the expected batch size q·N as the divisor. A method without DP-SGD has neither engines nor such stages."""
    name, method, ledger, _ = fitted
    spy, N = method.spy, len(train)
    charged = sorted(
        (s.noise_multiplier, s.max_grad_norm, s.sampling_rate, s.steps)
        for s in ledger.stages
        if s.mechanism == "poisson_gaussian" and (name, s.name) not in NOT_DP_SGD
    )
    for s in ledger.stages:  # a Poisson-subsampled Gaussian of its own: its batches come from DP-SGD's sampler
        if (name, s.name) in NOT_DP_SGD:
            drawn = [len(r["B"]) for r in spy.samplers if r["N"] == N and r["q"] == s.sampling_rate]
            assert sum(drawn) >= s.steps, f"{name}: fewer Poisson batches at the charged rate than charged steps"
    ran = sorted((e["sigma"], e["C"], e["q"], len(e["B"])) for e in spy.engines.values())
    assert ran == charged, f"{name}: executed DP-SGD steps differ from the ledger"
    rates = {r["q"] for r in spy.samplers if r["N"] == N}
    for e in spy.engines.values():
        assert len(e["noise"]) == len(e["B"]) and all(std == e["sigma"] * e["C"] for _, _, std in e["noise"])
        squares, count = sum(n[0] for n in e["noise"]), sum(n[1] for n in e["noise"])
        assert abs(math.sqrt(squares / count) / (e["sigma"] * e["C"]) - 1) < 0.03, f"{name}: noise std"
        q, steps = e["q"], len(e["B"])
        assert q in rates, f"{name}: no Poisson sampler over the {N} records at the charged rate {q}"
        assert e["expected"] == pytest.approx(q * N)
        mean_B = sum(e["B"]) / steps
        assert abs(mean_B - q * N) <= 5 * math.sqrt(q * N * (1 - q) / steps) + 1e-9, f"{name}: batch sizes"


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


def test_same_fit_seed_same_model_and_a_resumed_fit_ends_where_it_would_have(fitted, train) -> None:
    """The same seed gives the same model; a fit resumed from a mid-fit checkpoint under ANOTHER seed ends with
    that model and that ledger too (so a resume that ignored its checkpoint, or restored only part of the state,
    would fail: a fresh fit with seed 7 gives another model, checked last)."""
    name, method, ledger, budget = fitted
    again, midway = build(name, train), InterruptAt("half")
    again.fit(train, budget=budget, generator=torch.Generator().manual_seed(0), progress=midway)
    n = train.num_classes
    labels = labels_for(method, n, train.num_classes)

    def samples(m) -> torch.Tensor:
        return m.sample(n, labels=labels, generator=torch.Generator().manual_seed(6))

    assert torch.equal(samples(method), samples(again))
    assert midway.saved is not None, f"{name}: no checkpoint offered in the second half of its fit"
    resumed = build(name, train)
    resumed_ledger = resumed.fit(
        train, budget=budget, generator=torch.Generator().manual_seed(7), progress=InterruptAt("half", midway.saved)
    )
    assert torch.equal(samples(resumed), samples(method)), f"{name}: the resumed fit ended elsewhere"
    assert resumed_ledger.stages == ledger.stages, f"{name}: the resumed fit charged other stages"
    other = build(name, train)
    other.fit(train, budget=budget, generator=torch.Generator().manual_seed(7), progress=NullProgress())
    assert not torch.equal(samples(other), samples(method)), f"{name}: seed 7 gives the same model as seed 0"


class Recording(NullProgress):
    """A Progress that snapshots the fit as the harness does for `--set eval.curve=N`
    (bench.grid.curve.CurveRecorder)."""

    def __init__(self, recorder: curve.CurveRecorder) -> None:
        self.recorder, self.stages = recorder, []

    def shared(self, name: str, ident: dict, build) -> dict:
        """A shared stage (bench.contract.shared_stage) is trained under a Progress of its own, without a curve."""
        self.stages.append(name)
        return build(NullProgress())

    def start(self, total: int, description: str = "") -> None:
        self.recorder.start(total, description)

    def advance(self, n: int = 1) -> None:
        self.recorder.advance(n)


@pytest.mark.parametrize("name", METHODS)
def test_curve_snapshots_along_the_fit_load_into_a_fresh_instance(name, tmp_path) -> None:
    """Every method reports its units of progress, so a curve gets its points: each snapshot loads into a fresh
    instance that samples, and the last one, at the end of the fit, samples as the fitted model does (a method that
    changed its model after its last unit would fail here). On the 1×16×16 set: the units do not depend on shape."""
    train = data.load("synthetic", "train")
    method = build(name, train)
    recorder = curve.CurveRecorder(tmp_path / curve.FOLDER, 3, method.state_dict)
    budget = Budget.for_records(EPS, len(train))
    progress = Recording(recorder)
    method.fit(train, budget=budget, generator=torch.Generator().manual_seed(0), progress=progress)
    snaps = [load_torch(p) for p in curve.snapshots(tmp_path)]
    if recorder.total == 0 and progress.stages:
        pytest.skip(f"{name} trains only in a shared stage ({', '.join(progress.stages)}): no curve of its own yet")
    assert recorder.total > 0, f"{name}: no units of progress (Progress.start)"
    assert [s["units"] for s in snaps] == curve.points(recorder.total, 3), name
    labels = labels_for(method, train.num_classes, train.num_classes)
    for snap in snaps:
        fresh = build(name, train)
        fresh.load_state_dict(snap["state"])
        x = fresh.sample(train.num_classes, labels=labels, generator=torch.Generator().manual_seed(6))
        assert x.dtype == torch.uint8 and tuple(x.shape[1:]) == tuple(train.images.shape[1:])
    final = method.sample(train.num_classes, labels=labels, generator=torch.Generator().manual_seed(6))
    assert torch.equal(x, final), f"{name}: the last curve point is not the fitted model"
