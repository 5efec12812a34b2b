"""DP-HP: the Hermite features, the sensitivity of each released sum, the noise actually added, resume."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from bench.baselines import dphp
from bench.baselines.dphp import DPHP, Config
from torch import Tensor

from bench import config
from bench.contract import DataSpec, ImageDataset, NullProgress
from bench.errors import BenchError
from bench.privacy import N_DIVIDES_THE_RELEASE, Budget, calibrate, epsilon
from tests.conftest import TINY_PROFILE, InterruptAt

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")
# 2 epochs of 10 steps on the synthetic set (the [dphp] table's fields, not its per-dataset tables)
TINY: dict[str, Any] = {k: v for k, v in config.load_profile(TINY_PROFILE)["dphp"].items() if not isinstance(v, dict)}


def make(train, eps: float = 10.0, **sets: Any) -> tuple[DPHP, Budget]:
    cfg = config.build_dataclass(Config, TINY | sets, "dphp")
    return DPHP(cfg, spec=train.spec, device=CPU), Budget.for_records(eps, len(train))


def fit(method: DPHP, train, budget: Budget, progress=None, seed: int = 0):
    return method.fit(train, budget=budget, generator=torch.Generator().manual_seed(seed),
                      progress=progress or NullProgress())  # fmt: skip


def reference_embeddings(data: ImageDataset, dims: Tensor, rho: float, order: int) -> tuple[Tensor, Tensor]:
    """ME_with_HP and ME_with_HP_prod summed over the records, per record and class as the reference computes them
    (float64, no 1/n): the sum kernel [P·(C+1), classes] (pixel-major rows), the product kernel [(C+1)^D, classes]."""
    x = data.images.reshape(len(data), -1).double() / 255.0
    p = x.shape[1]
    out_sum = torch.zeros(p * (order + 1), data.num_classes, dtype=torch.float64)
    out_prod = torch.zeros((order + 1) ** len(dims), data.num_classes, dtype=torch.float64)
    for c in range(data.num_classes):
        xc = x[data.labels == c]
        phi = dphp.hermite_features(xc, rho, order).permute(1, 2, 0)  # [n_c, P, C+1]
        out_sum[:, c] = (phi.sum(0) / math.sqrt(p)).reshape(-1)
        b = phi[:, dims[0]]
        for d in dims[1:]:
            b = torch.einsum("i...j,ik->i...jk", b, phi[:, d])
        out_prod[:, c] = b.sum(0).reshape(-1)
    return out_sum, out_prod


def test_hermite_features_are_mehlers_expansion_of_the_gaussian_kernel() -> None:
    x = torch.linspace(0, 1, 101, dtype=torch.float64)
    for sigma2 in (0.005, 0.15, 1.0, 20.0):
        rho = dphp.find_rho(sigma2)
        assert rho == pytest.approx(math.sqrt(1 + sigma2**2) - sigma2, rel=1e-12) and 0 < rho < 1
        phi = dphp.hermite_features(x, rho, 4000)  # [K, 101]; ρ^4000 is negligible even at ρ = 0.995
        partial = (phi**2).cumsum(0)  # ‖φ(x)‖² truncated at every order C
        assert float(partial.max()) <= 1 + 1e-12  # truncation only lowers k(x, x) = 1
        assert torch.all(partial[-1] > 1 - 1e-6)
        kernel = torch.exp(-((x[:, None] - x[None]) ** 2) / (2 * sigma2))
        assert torch.allclose(phi.T @ phi, kernel, atol=1e-6)
    # the first functions, written out
    rho = dphp.find_rho(0.15)
    phi = dphp.hermite_features(x, rho, 2)
    phi0 = (1 - rho**2) ** 0.25 * torch.exp(-rho / (1 + rho) * x**2)
    assert torch.allclose(phi[0], phi0) and torch.allclose(phi[1], math.sqrt(2 * rho) * x * phi0)
    assert torch.allclose(phi[2], rho / math.sqrt(8) * (4 * x**2 - 2) * phi0)  # √(ρ²/(2² 2!)) H₂, H₂ = 4x² − 2


def test_embeddings_equal_the_references_per_record_sums(train) -> None:
    data = train.subset(torch.arange(300))
    dims = torch.tensor([17, 200])
    rho = dphp.find_rho(0.15)
    ref_sum, ref_prod = reference_embeddings(data, dims, rho, 12)
    ours = dphp.sum_embedding(data, rho, 12, CPU)  # [C+1, classes, P]
    assert torch.allclose(ours.permute(2, 0, 1).reshape(-1, 10), ref_sum, rtol=1e-10, atol=1e-10)
    assert torch.allclose(dphp.prod_embedding(data, dims, rho, 12, CPU), ref_prod, rtol=1e-10, atol=1e-10)
    # three pixels: (C+1)^3 features, first pixel's index major, as ME_with_HP_prod
    dims3 = torch.tensor([5, 100, 255])
    _, ref3 = reference_embeddings(data, dims3, rho, 4)
    assert torch.allclose(dphp.prod_embedding(data, dims3, rho, 4, CPU), ref3, rtol=1e-10, atol=1e-10)


def test_adding_or_removing_one_record_moves_each_sum_by_at_most_one(train) -> None:
    """Δ₂ ≤ 1 under add/remove for both kernels, any record (black, white, noise), any label, narrow or wide."""
    g = torch.Generator().manual_seed(3)
    extremes = torch.stack([torch.zeros(1, 16, 16), torch.full((1, 16, 16), 255.0)]).to(torch.uint8)
    records = torch.cat([extremes, torch.randint(0, 256, (10, 1, 16, 16), generator=g, dtype=torch.uint8)])
    base = train.subset(torch.arange(100))
    largest = 0.0
    for sigma2, order in ((0.005, 100), (0.15, 100), (20.0, 30)):
        rho = dphp.find_rho(sigma2)
        s = dphp.sum_embedding(base, rho, order, CPU)
        for dims in (torch.tensor([0, 1]), torch.tensor([40, 3, 255])):
            p = dphp.prod_embedding(base, dims, rho, min(order, 20), CPU)
            for i, x in enumerate(records):
                more = ImageDataset(
                    torch.cat([base.images, x[None]]), torch.cat([base.labels, torch.tensor([i % 10])]), 10
                )
                change_sum = torch.linalg.vector_norm(dphp.sum_embedding(more, rho, order, CPU) - s)
                change_prod = torch.linalg.vector_norm(dphp.prod_embedding(more, dims, rho, min(order, 20), CPU) - p)
                assert float(change_sum) <= 1 + 1e-6 and float(change_prod) <= 1 + 1e-6, (sigma2, order, i)
                largest = max(largest, float(change_sum), float(change_prod))
    assert largest > 0.99  # the bound is reached (wide kernels), so this checks something


def test_the_noise_actually_added_is_the_ledgers(train) -> None:
    # orders 20/20: 21·10·256 sum-kernel draws, 2 × 441·10 product-kernel draws: stds known to about 1%
    method, budget = make(train, order_sum=20, order_prod=20)
    ledger = fit(method, train, budget)
    sum_stage, prod_stage = ledger.stages
    assert (sum_stage.name, sum_stage.mechanism, sum_stage.count) == ("sum-kernel", "gaussian", 1)
    assert ledger.assumptions == [N_DIVIDES_THE_RELEASE]  # N divides the release: the card says so
    assert (prod_stage.name, prod_stage.mechanism, prod_stage.count) == ("product-kernel", "gaussian", 2)
    for stage in ledger.stages:
        assert "add/remove" in stage.to_dict()["sensitivity"]
    assert epsilon(ledger, budget.delta, budget.accountant) == pytest.approx(10.0, rel=1e-3)
    # the reference's split sets the ratio: each part calibrated alone to 80% / 20% of ε and half of δ
    alone_sum = calibrate(8.0, lambda s: dphp.release_stages(s, None, 0), budget.delta / 2)
    alone_prod = calibrate(2.0, lambda s: dphp.release_stages(None, s, 2), budget.delta / 2)
    assert prod_stage.noise_multiplier / sum_stage.noise_multiplier == pytest.approx(alone_prod / alone_sum, rel=1e-9)
    assert sum_stage.noise_multiplier < alone_sum  # composed accounting spends what basic composition leaves
    n, rho = len(train), dphp.find_rho(0.15)
    noise = method.noisy_sum.double() * n - dphp.sum_embedding(train, rho, 20, CPU)
    assert float(noise.std()) == pytest.approx(sum_stage.noise_multiplier, rel=0.03)
    assert abs(float(noise.mean())) < 0.05 * sum_stage.noise_multiplier
    assert len(method.prod_dims) == len(method.noisy_prod) == 2
    assert not torch.equal(method.prod_dims[0], method.prod_dims[1])  # pixels drawn anew each epoch
    prod_noise = torch.cat([
        (released.double() * n - dphp.prod_embedding(train, dims, rho, 20, CPU)).flatten()
        for dims, released in zip(method.prod_dims, method.noisy_prod, strict=True)
    ])  # fmt: skip
    assert float(prod_noise.std()) == pytest.approx(prod_stage.noise_multiplier, rel=0.03)
    assert abs(float(prod_noise.mean())) < 0.05 * prod_stage.noise_multiplier
    # fixed σ's are used as given (and charged as given)
    fixed, _ = make(train, sigma_sum=3.0, sigma_prod=7.0)
    assert [s.noise_multiplier for s in fit(fixed, train, budget).stages] == [3.0, 7.0]
    # no split: one σ for all 1 + epochs releases
    one, _ = make(train, split=False)
    s1, s2 = fit(one, train, budget).stages
    assert s1.noise_multiplier == s2.noise_multiplier
    # the reference's replace-one noise: twice both σ's, charged as such (ε below the target)
    ro, _ = make(train, order_sum=20, order_prod=20, adjacency="replace-one")
    ro_ledger = fit(ro, train, budget)
    assert [s.noise_multiplier for s in ro_ledger.stages] == pytest.approx(
        [2 * s.noise_multiplier for s in ledger.stages]
    )
    assert epsilon(ro_ledger, budget.delta, budget.accountant) < 0.6 * 10.0
    ro_noise = ro.noisy_sum.double() * n - dphp.sum_embedding(train, rho, 20, CPU)
    assert float(ro_noise.std()) == pytest.approx(2 * sum_stage.noise_multiplier, rel=0.03)


def test_training_reads_the_private_data_only_through_the_releases(train, monkeypatch) -> None:
    calls: list[str] = []
    real_sum, real_prod = dphp.sum_embedding, dphp.prod_embedding
    monkeypatch.setattr(dphp, "sum_embedding", lambda *a: calls.append("sum") or real_sum(*a))
    monkeypatch.setattr(dphp, "prod_embedding", lambda *a: calls.append("prod") or real_prod(*a))

    class Touched(ImageDataset):
        reads = 0

        def __getattribute__(self, name: str) -> Any:
            if name in ("images", "labels"):
                type(self).reads += 1
            return super().__getattribute__(name)

    spy = Touched(train.images, train.labels, train.num_classes)
    method, budget = make(train, epochs=3, batch_size=50)  # 40 steps an epoch
    Touched.reads = 0
    fit(method, spy, budget)
    assert calls == ["sum", "prod", "prod", "prod"]  # one sum-kernel pass, one product-kernel pass an epoch
    assert Touched.reads <= 30 < 3 * 40  # a handful of reads per pass, none per generator step


@pytest.mark.parametrize("at", [5, 10, 13])  # mid-epoch 1, at the end of epoch 1, mid-epoch 2 (10 steps an epoch)
def test_resume_continues_from_the_checkpoint_without_drawing_a_release_twice(train, monkeypatch, at) -> None:
    whole, budget = make(train)
    interrupted = InterruptAt(at)
    ledger = fit(whole, train, budget, interrupted)
    assert interrupted.saved is not None and interrupted.saved["step"] == at
    drawn_before = len(interrupted.saved["model"]["noisy_prod"])
    assert drawn_before == (at - 1) // 10 + 1  # the epochs started so far
    releases: list[int] = []
    real = dphp.gaussian_release
    monkeypatch.setattr(dphp, "gaussian_release", lambda s, *a: releases.append(s.numel()) or real(s, *a))
    resumed, _ = make(train)
    again = fit(resumed, train, budget, InterruptAt(0, interrupted.saved), seed=7)  # another seed: the checkpoint rules
    assert len(releases) == 2 - drawn_before  # only the product-kernel releases of epochs not started yet
    assert again.stages == ledger.stages
    assert torch.equal(resumed.noisy_sum, whole.noisy_sum)
    for a, b in zip(resumed.noisy_prod, whole.noisy_prod, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(resumed.prod_dims, whole.prod_dims, strict=True):
        assert torch.equal(a, b)
    labels = torch.arange(20) % 10
    x = whole.sample(20, labels=labels, generator=torch.Generator().manual_seed(1))
    y = resumed.sample(20, labels=labels, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, y)


@pytest.mark.parametrize(
    "sets, message",
    [
        ({"order_sum": -1}, "order_sum must be >= 0"),
        ({"prod_dimension": 0}, "prod_dimension must be >= 1"),
        ({"order_prod": 20, "prod_dimension": 5}, r"\(order_prod \+ 1\) \*\* prod_dimension must be <= 1e6"),
        ({"kernel_length_sum": 0.0}, "kernel_length_sum must be a finite number > 0"),
        ({"kernel_length_prod": -0.15}, "kernel_length_prod must be a finite number > 0"),
        ({"gamma": float("inf")}, "gamma must be a finite number > 0"),
        ({"split_sum_ratio": 1.0}, r"split_sum_ratio must be in \(0, 1\), got 1.0"),
        ({"split": "yes"}, "expected true or false"),
        ({"sigma_sum": 2.0}, "set both sigma_sum and sigma_prod or neither"),
        ({"sigma_sum": 2.0, "sigma_prod": 0.0}, "sigma_prod must be a finite number > 0"),
        ({"generator": "mlp"}, r"'mlp' is not one of \['fc', 'conv'\]"),
        ({"gen_hidden": [500]}, "gen_hidden must be two positive widths"),
        ({"kernel_size": 4}, "kernel_size must be odd"),
        ({"lr_decay": 1.5}, "need lr > 0 and 0 < lr_decay <= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_bad_config_is_a_one_line_error(train, sets, message) -> None:
    with pytest.raises(BenchError, match=message) as e:
        make(train, **sets)
    assert "\n" not in str(e.value)


def test_missing_dataset_settings_name_the_authors_values(train) -> None:
    method = DPHP(Config(), spec=train.spec, device=CPU)  # the defaults: no kernel length, gamma or generator
    budget = Budget.for_records(1.0, len(train))
    with pytest.raises(BenchError, match=r"σ² = 0\.005 .* gamma = 20 for MNIST, σ² = 0\.15 and gamma = 10 for Fash"):
        fit(method, train, budget)
    kernel = {k: TINY[k] for k in ("kernel_length_sum", "kernel_length_prod", "gamma")}
    no_gen = DPHP(Config(**kernel), spec=train.spec, device=CPU)
    with pytest.raises(BenchError, match='generator is not set .*"fc" for MNIST and "conv" for Fashion-MNIST'):
        fit(no_gen, train, budget)
    with pytest.raises(BenchError, match="generator is not set"):
        no_gen.sample(2, labels=torch.zeros(2, dtype=torch.int64), generator=torch.Generator())
    fc, _ = make(train)
    with pytest.raises(BenchError, match="unlimited budget needs explicit sigma_sum and sigma_prod"):
        fit(fc, train, Budget.unlimited(1e-4))
    with pytest.raises(BenchError, match="prod_dimension 300 is more than the 256 pixels"):
        fit(make(train, order_prod=0, prod_dimension=300)[0], train, budget)
    with pytest.raises(BenchError, match="class-conditional"):
        fc.sample(2, labels=None, generator=torch.Generator())
    odd = DataSpec(channels=1, height=18, width=18, num_classes=10, num_train=4)
    with pytest.raises(BenchError, match="sides divisible by 4, got 18×18"):
        DPHP(Config(generator="conv"), spec=odd, device=CPU)


def test_generators_are_the_references() -> None:
    """FCCondGen('500,500') and ConvCondGen('500,500', '16,8', '5,5') on 1×28×28: the reference's parameter counts."""
    spec = DataSpec(channels=1, height=28, width=28, num_classes=10, num_train=60_000)
    fc = DPHP(Config(generator="fc"), spec=spec, device=CPU).released_model()
    # Linear(15,500) + BN(500) + Linear(500,500) + BN(500) + Linear(500,784)
    assert sum(p.numel() for p in fc.parameters()) == 8000 + 1000 + 250_500 + 1000 + 392_784
    conv = DPHP(Config(generator="conv"), spec=spec, device=CPU).released_model()
    # Linear(15,500) + BN(500) + Linear(500,784) + BN(784) + Conv(16,8,5) + Conv(8,1,5)
    assert sum(p.numel() for p in conv.parameters()) == 8000 + 1000 + 392_784 + 1568 + 3208 + 201
    z, y = torch.randn(4, 5), torch.arange(4)
    for gen in (fc, conv):
        with torch.no_grad():
            x = gen.eval()(z, y)
        assert tuple(x.shape) == (4, 1, 28, 28) and float(x.min()) >= 0 and float(x.max()) <= 1


def test_synthetic_embeddings_equal_the_references_per_class_code() -> None:
    """The synthetic embeddings in fit (order-major, batched) equal the reference's per-class ME_with_HP."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 256, generator=g, dtype=torch.float64)
    labels = torch.arange(12) % 10
    rho = dphp.find_rho(0.15)
    onehot = F.one_hot(labels, 10).double() / 12
    ours = torch.matmul(onehot.T, dphp.hermite_features(x, rho, 6)) / 16.0  # [C+1, classes, P], as fit
    for c in range(10):
        phi = dphp.hermite_features(x[labels == c], rho, 6).permute(1, 2, 0)  # ME_with_HP: [n_c, P, C+1]
        ref = phi.sum(0) / 12 / math.sqrt(256)  # / batch size, / √P
        assert torch.allclose(ours[:, c, :].T, ref)
