"""DP-NTK: the closed-form features against autograd's per-sample gradients, the sensitivity of the release, the
noise actually added, one read of the private data, resume."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from bench.baselines import dpntk
from torch.func import functional_call, grad, vmap

from bench import config
from bench.contract import ImageDataset, NullProgress
from bench.errors import BenchError
from bench.grid import registry
from bench.privacy import N_DIVIDES_THE_RELEASE, Budget, epsilon
from tests.conftest import TINY_PROFILE, InterruptAt

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")


def make(train, eps: float = 10.0, **sets: Any) -> tuple[dpntk.DPNTK, Budget]:
    cls = registry.get("dpntk")
    cfg, _ = config.resolve(cls.Config, profile=config.load_profile(TINY_PROFILE), method="dpntk",
                            dataset="synthetic", epsilon=eps, sets=sets)  # fmt: skip
    return cls(cfg, spec=train.spec, device=CPU), Budget.for_records(eps, len(train))


def fit(method: dpntk.DPNTK, train, budget: Budget, progress=None, seed: int = 0):
    return method.fit(train, budget=budget, generator=torch.Generator().manual_seed(seed),
                      progress=progress or NullProgress())  # fmt: skip


def reference_features(ntk: dpntk.NTK, x: torch.Tensor) -> torch.Tensor:
    """The reference's feature, sample by sample: ∂(Σₒ fₒ(x))/∂θ over parameters() in order, unit norm."""
    params = dict(ntk.named_parameters())

    def total(p: dict, xi: torch.Tensor) -> torch.Tensor:
        return functional_call(ntk, p, (xi[None],)).sum()

    grads = vmap(grad(total), in_dims=(None, 0))(params, x)
    flat = torch.cat([grads[name].flatten(1) for name, _ in ntk.named_parameters()], dim=1)
    return flat / flat.norm(dim=1, keepdim=True)


def test_closed_form_features_equal_autograds_per_sample_gradients() -> None:
    torch.manual_seed(0)
    ntk = dpntk.NTK(input_size=30, width=12, outputs=4).double()
    x = torch.rand(9, 30, dtype=torch.float64)
    labels = torch.tensor([0, 2, 2, 1, 0, 2, 1, 1, 0])
    expected = reference_features(ntk, x)
    f = dpntk.ntk_features(ntk, x, create_graph=False)
    sums = dpntk.class_sums(f, labels, classes=3, outputs=4)
    assert sums.shape == (3, ntk.feature_dim)
    for c in range(3):
        torch.testing.assert_close(sums[c], expected[labels == c].sum(0))
    # and it stays differentiable in x (the generator's gradient flows through the features)
    xg = x.clone().requires_grad_(True)
    fg = dpntk.ntk_features(ntk, xg, create_graph=True)
    (dx,) = torch.autograd.grad(dpntk.class_sums(fg, labels, 3, 4).pow(2).sum(), xg)
    xr = x.clone().requires_grad_(True)
    (dref,) = torch.autograd.grad(
        sum((reference_features(ntk, xr)[labels == c].sum(0) ** 2).sum() for c in range(3)), xr
    )
    torch.testing.assert_close(dx, dref)


def test_adding_or_removing_one_record_moves_the_sum_by_exactly_one(train) -> None:
    """Δ₂S = 1 under add/remove, whatever the record: black, white, noise, any label."""
    torch.manual_seed(1)
    ntk = dpntk.NTK(input_size=256, width=24, outputs=10)
    g = torch.Generator().manual_seed(3)
    extremes = torch.stack([torch.zeros(1, 16, 16), torch.full((1, 16, 16), 255.0)]).to(torch.uint8)
    records = torch.cat([extremes, torch.randint(0, 256, (12, 1, 16, 16), generator=g, dtype=torch.uint8)])
    base = train.subset(torch.arange(200))
    s = dpntk.sum_embedding(base, ntk, CPU)
    for i, x in enumerate(records):
        y = torch.tensor([i % 10])
        more = ImageDataset(torch.cat([base.images, x[None]]), torch.cat([base.labels, y]), 10)
        change = torch.linalg.matrix_norm(dpntk.sum_embedding(more, ntk, CPU) - s)
        assert float(change) == pytest.approx(1.0, abs=1e-4), i


def test_the_noise_actually_added_is_the_ledgers(train) -> None:
    method, budget = make(train, ntk_width=64)  # 10 × 16,522 draws: the std is known to well under 1%
    ledger = fit(method, train, budget)
    (stage,) = ledger.stages
    assert (stage.mechanism, stage.count) == ("gaussian", 1)
    assert ledger.assumptions == [N_DIVIDES_THE_RELEASE]
    assert "add/remove" in stage.to_dict()["sensitivity"]
    assert epsilon(ledger, budget.delta, budget.accountant) == pytest.approx(10.0, rel=1e-3)
    noise = method.noisy_mean * len(train) - dpntk.sum_embedding(train, method.ntk, CPU)
    assert float(noise.std()) == pytest.approx(stage.noise_multiplier, rel=0.02)
    assert abs(float(noise.mean())) < 0.02 * stage.noise_multiplier
    ro, _ = make(train, ntk_width=64, adjacency="replace-one")  # the reference's 2σ/n, charged as such
    ro_ledger = fit(ro, train, budget)
    assert ro_ledger.stages[0].noise_multiplier == pytest.approx(2 * stage.noise_multiplier)
    assert epsilon(ro_ledger, budget.delta, budget.accountant) < 0.6 * 10.0
    ro_noise = ro.noisy_mean * len(train) - dpntk.sum_embedding(train, ro.ntk, CPU)
    assert float(ro_noise.std()) == pytest.approx(2 * stage.noise_multiplier, rel=0.02)


def test_training_reads_the_private_data_once_through_the_release(train, monkeypatch) -> None:
    calls = []
    real = dpntk.sum_embedding
    monkeypatch.setattr(
        dpntk, "sum_embedding", lambda data, ntk, device: calls.append(len(data)) or real(data, ntk, device)
    )

    class Touched(ImageDataset):
        reads = 0

        def __getattribute__(self, name: str) -> Any:
            if name in ("images", "labels"):
                type(self).reads += 1
            return super().__getattribute__(name)

    spy = Touched(train.images, train.labels, train.num_classes)
    method, budget = make(train, iterations=30)
    Touched.reads = 0
    fit(method, spy, budget)
    assert calls == [len(train)]  # one embedding pass over all the records
    assert Touched.reads <= 10 < method.config.iterations  # none per generator step


def test_the_schedule_decays_once_after_the_first_step_as_the_reference(train) -> None:
    method, budget = make(train, iterations=5, lr=0.01, lr_decay=0.5, scheduler_interval=2001)
    lrs = []
    method2, _ = make(train, iterations=5, lr=0.01, lr_decay=0.5, scheduler_interval=2)
    for m in (method, method2):
        progress = InterruptAt(5)
        fit(m, train, budget, progress)
        lrs.append(progress.saved["optimizer"]["param_groups"][0]["lr"])
    assert lrs[0] == pytest.approx(0.005)  # decayed after step 0 only (0 % 2001 == 0)
    assert lrs[1] == pytest.approx(0.01 * 0.5**3)  # after steps 0, 2 and 4


def test_resume_continues_from_the_checkpoint_without_a_second_release(train, monkeypatch) -> None:
    whole, budget = make(train)
    interrupted = InterruptAt(3)
    ledger = fit(whole, train, budget, interrupted)
    assert interrupted.saved is not None and interrupted.saved["step"] == 3
    releases = []
    real = dpntk.sum_embedding
    monkeypatch.setattr(dpntk, "sum_embedding", lambda *a: releases.append(1) or real(*a))
    resumed, _ = make(train)
    again = fit(resumed, train, budget, InterruptAt(0, interrupted.saved), seed=7)  # another seed: the checkpoint rules
    assert releases == []  # the noisy embedding came from the checkpoint, not from a new draw
    assert again.stages == ledger.stages
    assert torch.equal(resumed.noisy_mean, whole.noisy_mean)
    labels = torch.arange(20) % 10
    a = whole.sample(20, labels=labels, generator=torch.Generator().manual_seed(1))
    b = resumed.sample(20, labels=labels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "sets, message",
    [
        ({"ntk_width": 0}, "ntk_width must be >= 1"),
        ({"ntk_outputs": 0}, "ntk_outputs must be >= 1"),
        ({"noise_multiplier": 0.0}, "noise_multiplier must be a finite number > 0"),
        ({"kernel_size": 4}, "kernel_size must be odd"),
        ({"lr_decay": 1.5}, "0 < lr_decay <= 1"),
        ({"adjacency": "swap"}, "adjacency"),
    ],
)
def test_bad_config_is_a_one_line_error(train, sets, message) -> None:
    with pytest.raises(BenchError, match=message) as e:
        make(train, **sets)
    assert "\n" not in str(e.value)
