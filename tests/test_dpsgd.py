"""The DP-SGD step, checked on the running code (docs/privacy.md, "The checks that exist as tests")."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any
from unittest.mock import patch

import pytest
import torch
from scipy import stats
from torch import Tensor, nn

import bench.privacy.dpsgd as dpsgd
from bench.nets.unet import UNet, UNetConfig
from bench.privacy.dpsgd import DPSGD, PoissonSampler, clip_factors, per_example_norms

NET = UNetConfig(base_channels=8, channel_mults=(1, 2), groups=4, num_classes=3)
ALPHA_BAR = torch.linspace(0.999, 0.05, 10)
ROW_MODES = [("folded", 2), ("functorch", 2), ("hooks", 2), ("ghost", 1)]  # ghost: one row per example


def dpdm_loss(model_call: Callable[..., Tensor], x: Tensor, y: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """DPDM-like: x [C,H,W], y [], t [K], noise [K,C,H,W] -> the denoising loss averaged over K draws."""
    a = ALPHA_BAR.to(t.device)[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x + (1 - a).sqrt() * noise
    return (model_call(x_t, t, y.expand(t.shape[0])) - noise).pow(2).mean()


def zero_loss(model_call: Callable[..., Tensor], x: Tensor, y: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    return 0.0 * dpdm_loss(model_call, x, y, t, noise)  # every gradient is exactly zero


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


def make_batch(B: int, K: int, seed: int = 0) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 1, 8, 8, generator=g) * 2 - 1
    y = torch.randint(0, NET.num_classes, (B,), generator=g)
    t = torch.randint(0, len(ALPHA_BAR), (B, K), generator=g)
    return x, y, t, torch.randn(B, K, 1, 8, 8, generator=g)


def make_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(NET)


def make_dp(model: nn.Module, **kwargs: Any) -> DPSGD:
    opts: dict[str, Any] = dict(
        per_example_loss=dpdm_loss, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, num_records=8
    )
    opts.update(kwargs)
    lr = opts.pop("lr", 0.1)
    seed = opts.pop("seed", 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return DPSGD(model, optimizer, generator=torch.Generator().manual_seed(seed), **opts)


def reference_grads(model: nn.Module, loss: Callable[..., Tensor], batch: tuple[Tensor, ...]) -> list[Tensor]:
    """Slow reference: batch size 1, plain autograd, one example at a time -> [B, *p.shape] per parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = [torch.autograd.grad(loss(model, *(b[i] for b in batch)), params) for i in range(len(batch[0]))]
    return [torch.stack(g) for g in zip(*rows, strict=True)]


def params_of(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ------------------------------------------------------------------------------- per-example gradients


@pytest.mark.parametrize(("mode", "K"), [("folded", 1), *ROW_MODES])
def test_per_example_gradients_equal_batch_size_one_reference(mode: str, K: int) -> None:
    model, batch = make_unet(), make_batch(3, K)
    ref = reference_grads(model, dpdm_loss, batch)
    dp = make_dp(model, mode=mode, max_grad_norm=0.05)
    if mode == "ghost":  # norms without per-example gradients
        _, norms, _, _ = dp._clipped_sum(*batch)
        torch.testing.assert_close(norms, per_example_norms(ref), atol=1e-5, rtol=1e-5)
        return
    grads, losses = dp._per_example_grads(*batch)
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    ref_losses = torch.stack([dpdm_loss(model, *(b[i] for b in batch)) for i in range(3)]).detach()
    torch.testing.assert_close(losses, ref_losses)


class Mixed(nn.Module):
    """Every layer type the folded mode knows, a grouped strided conv, a Linear used twice, in-place ops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2, bias=False)
        self.emb = nn.Embedding(5, 4, padding_idx=0)
        self.norm = nn.LayerNorm(4)
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:  # x [N, 2, 6, 6], y int64 [N] -> [N, 4]
        h = torch.relu_(self.conv(x)).mean((2, 3)) + self.emb(y)  # in-place on a layer's output
        return self.lin(torch.tanh(self.lin(self.norm(h))))


@pytest.mark.parametrize(
    ("cin", "cout", "kernel", "options"),
    [
        (3, 4, 1, {}),  # 1×1: a batched matrix product
        (3, 4, 1, {"stride": 2}),  # 1×1 strided: the grouped convolution
        (3, 1, 3, {"padding": 1}),  # one output channel: the forward form
        (1, 4, 3, {"padding": 1}),
        (1, 4, 3, {"stride": 2, "padding": 1}),  # stride and dilation swap roles in the forward form
        (3, 1, 3, {"dilation": 2, "padding": 2}),
        (1, 2, (3, 2), {"stride": (2, 1), "dilation": (1, 2), "padding": (1, 0)}),  # its output is cropped
        (3, 4, 3, {"padding": 1}),  # the grouped convolution
        (4, 2, 3, {"groups": 2, "padding": 1}),
    ],
)
def test_every_form_of_the_per_example_conv_gradient_equals_the_reference(
    cin: int, cout: int, kernel: int | tuple[int, int], options: dict[str, Any]
) -> None:
    """bench.privacy.dpsgd._conv2d picks one of three forms by the layer's shape; each gives autograd's per-example
    gradient, with 3 rows per example (summed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(cin, cout, kernel, **options), nn.Tanh())

    def loss(call: Callable[..., Tensor], x: Tensor) -> Tensor:
        return call(torch.stack([x, x.flip(-1), 0.5 * x])).pow(2).sum()

    batch = (torch.randn(5, cin, 7, 6),)
    grads, _ = make_dp(model, mode="folded", per_example_loss=loss)._per_example_grads(*batch)
    for g, r in zip(grads, reference_grads(model, loss, batch), strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def two_calls_loss(model_call: Callable[..., Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Calls the model twice per example, with 1 and 3 rows (a GAN discriminator on real and fake)."""
    one = model_call(x[None], y[None])
    three = model_call(torch.stack([x, x.flip(-1), -x]), torch.stack([y, y, torch.zeros_like(y)]))
    return one.pow(2).sum() + three.tanh().mean()


@pytest.mark.parametrize("mode", ["folded", "functorch"])
def test_per_example_gradients_with_two_model_calls_and_tied_layers(mode: str) -> None:
    torch.manual_seed(0)
    model = Mixed()
    batch = (torch.randn(5, 2, 6, 6), torch.tensor([0, 1, 4, 1, 2]))
    ref = reference_grads(model, two_calls_loss, batch)
    grads, _ = make_dp(model, mode=mode, per_example_loss=two_calls_loss)._per_example_grads(*batch)
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="once"):
        make_dp(Mixed(), mode="hooks", per_example_loss=two_calls_loss).step(*batch)


class MixesRows(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x - x.mean(0, keepdim=True))  # every row sees the others: not row-wise


def test_a_model_that_mixes_rows_is_refused_by_row_modes_and_auto_falls_back() -> None:
    def loss(call: Callable[..., Tensor], x: Tensor) -> Tensor:
        return call(torch.stack([x, 2 * x])).pow(2).sum()

    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="mixes"):
        make_dp(MixesRows(), mode="folded", per_example_loss=loss).step(x)
    model = MixesRows()
    dp = make_dp(model, per_example_loss=loss)
    with pytest.warns(UserWarning, match="functorch"):
        grads, _ = dp._per_example_grads(x)
    assert dp.mode == "functorch"
    for g, r in zip(grads, reference_grads(model, loss, (x,)), strict=True):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


class DropoutModel(nn.Module):
    """Dropout after a Linear, on rows that are (mix=True) or are not (mix=False) centred on the batch mean."""

    def __init__(self, mix: bool) -> None:
        super().__init__()
        self.lin, self.drop, self.mix = nn.Linear(3, 2), nn.Dropout(0.5), mix

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.lin(x - x.mean(0, keepdim=True) if self.mix else x))


def test_the_row_check_also_runs_for_models_with_dropout() -> None:
    """A model with dropout is checked with its dropout off: mixing rows is refused, a row-wise one trains (and
    its dropout is back on afterwards)."""

    def loss(call: Callable[..., Tensor], x: Tensor) -> Tensor:
        return call(torch.stack([x, 2 * x])).pow(2).sum()

    x = torch.randn(6, 3)
    with pytest.raises(ValueError, match="mixes"):
        make_dp(DropoutModel(mix=True), mode="folded", per_example_loss=loss).step(x)
    model = DropoutModel(mix=False)
    make_dp(model, mode="folded", per_example_loss=loss).step(x)
    assert model.drop.training


class SparesExampleZero(nn.Module):
    """Mixes every row but the first: the rows of the other examples see their mean (example 0 alone is exact)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.lin(x)
        if len(x) == 1:
            return out
        return torch.cat([out[:1], out[1:] + x[1:].mean(0, keepdim=True).sum()])


@pytest.mark.parametrize("B", [2, 5])
def test_the_row_check_compares_the_last_and_a_random_example_too(B: int) -> None:
    """A model that leaves example 0 untouched but mixes the others passed the old check (example 0 only); the check
    now also compares the last example and one drawn at random, in both row paths."""

    def loss(call: Callable[..., Tensor], x: Tensor) -> Tensor:
        return call(x[None]).pow(2).sum()  # one row per example: example 0 is row 0

    x = torch.randn(B, 3)
    with pytest.raises(ValueError, match="mixes"):
        make_dp(SparesExampleZero(), mode="folded", per_example_loss=loss).step(x)
    dp = make_dp(SparesExampleZero(), mode="folded", per_example_loss=dpsgd.output_surrogate)
    with pytest.raises(ValueError, match="mixes"):
        dp.step_outputs((x[:, None],), _output_grad(torch.zeros(B, 1, 1)))
    model = nn.Linear(3, 1)  # row-wise: passes, and its gradients are the reference's
    grads, _ = make_dp(model, mode="folded", per_example_loss=loss)._per_example_grads(x)
    for g, r in zip(grads, reference_grads(model, loss, (x,)), strict=True):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


class MixesLater(nn.Module):
    """Row-wise until `mix` is set, then every row sees the batch mean."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.mix = nn.Linear(3, 1), False

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x - x.mean(0, keepdim=True) if self.mix else x)


@pytest.mark.parametrize("path", ["step", "step_outputs"])
def test_the_row_check_runs_at_the_first_step_and_every_row_check_every_steps(path: str) -> None:
    """The check's schedule: a model that starts mixing rows after the first step trains unchecked until step
    ROW_CHECK_EVERY + 1, where it is refused; before the first step of a new engine (a resumed fit) it is checked."""
    model, x = MixesLater(), torch.randn(4, 3)

    def loss(call: Callable[..., Tensor], x: Tensor) -> Tensor:
        return call(x[None]).pow(2).sum()

    def make() -> DPSGD:
        return make_dp(model, mode="folded", per_example_loss=loss if path == "step" else dpsgd.output_surrogate)

    def step(dp: DPSGD) -> None:
        dp.step(x) if path == "step" else dp.step_outputs((x[:, None],), _output_grad(torch.zeros(4, 1, 1)))

    dp = make()
    step(dp)
    model.mix = True
    for _ in range(dpsgd.ROW_CHECK_EVERY - 1):
        step(dp)
    with pytest.raises(ValueError, match="mixes"):
        step(dp)
    with pytest.raises(ValueError, match="mixes"):
        step(make())


def test_the_row_check_tolerance_is_tight() -> None:
    """A mixing of 1e-3 of the output (far below the old 1e-2 tolerance) is refused in float32."""

    class Slight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x: Tensor) -> Tensor:
            out = self.lin(x)
            return out + 1e-3 * out.detach().abs().max() * (len(x) > 2)  # shifts every output when batched

    def loss(call: Callable[..., Tensor], x: Tensor) -> Tensor:
        return call(torch.stack([x, 2 * x])).pow(2).sum()

    with pytest.raises(ValueError, match="mixes"):
        make_dp(Slight(), mode="folded", per_example_loss=loss).step(torch.randn(4, 3))


@pytest.mark.parametrize(("mode", "K"), ROW_MODES)
def test_every_clipped_per_example_norm_is_at_most_C(mode: str, K: int) -> None:
    C = 0.05  # below every per-example norm here, so every example is clipped
    model, batch = make_unet(), make_batch(4, K)
    ref = reference_grads(model, dpdm_loss, batch)
    dp = make_dp(model, mode=mode, max_grad_norm=C)
    sums, norms, factors, _ = dp._clipped_sum(*batch)
    assert (norms > C).all()
    assert (norms * factors <= C).all()
    if mode != "ghost":
        grads, _ = dp._per_example_grads(*batch)
        clipped = [g * clip_factors(per_example_norms(grads), C).view(-1, *[1] * (g.dim() - 1)) for g in grads]
        assert (per_example_norms(clipped) <= C * (1 + 1e-6)).all()
    # the released sum is the sum of the clipped reference gradients
    ref_factors = torch.clamp(C / (per_example_norms(ref) + 1e-6), max=1.0)
    for s, r in zip(sums, ref, strict=True):
        torch.testing.assert_close(s, torch.tensordot(ref_factors, r, dims=1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("mode", "K"), ROW_MODES)
def test_no_clipping_and_no_noise_is_a_plain_step(mode: str, K: int) -> None:
    model, batch = make_unet(), make_batch(4, K)  # B = q·N = 0.5 · 8
    plain = copy.deepcopy(model)
    dp = make_dp(model, mode=mode, noise_multiplier=0.0, max_grad_norm=math.inf)
    dp.step(*batch)

    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1)
    torch.stack([dpdm_loss(plain, *(b[i] for b in batch)) for i in range(4)]).mean().backward()
    optimizer.step()
    torch.testing.assert_close(params_of(model), params_of(plain), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("mode", "K"), ROW_MODES)
def test_physical_batches_give_the_same_clipped_sum(mode: str, K: int) -> None:
    batch = make_batch(5, K)
    whole = make_dp(make_unet(), mode=mode, max_grad_norm=0.05)._clipped_sum(*batch)
    chunked = make_dp(make_unet(), mode=mode, max_grad_norm=0.05, max_physical_batch_size=2)._clipped_sum(*batch)
    for a, b in zip([*whole[0], *whole[1:]], [*chunked[0], *chunked[1:]], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_ghost_refuses_several_rows_per_example() -> None:
    dp = make_dp(make_unet(), mode="ghost")
    with pytest.raises(ValueError, match="row"):
        dp.step(*make_batch(2, 2))


def test_auto_picks_folded_for_the_unet_and_functorch_for_unknown_layers() -> None:
    assert make_dp(make_unet()).mode == "folded"
    conv1d = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 1))
    assert make_dp(conv1d).mode == "functorch"
    with pytest.raises(ValueError, match="Conv1d"):
        make_dp(conv1d, mode="folded")


# ------------------------------------------------------------------------------------------ the noise


@pytest.mark.parametrize(("mode", "K"), ROW_MODES)
def test_noise_std_is_sigma_C_lr_over_expected_batch_size(mode: str, K: int) -> None:
    sigma, C, lr, q, N = 2.0, 0.5, 1.0, 0.25, 16  # drift std per coordinate and step: σ·C·lr/(q·N) = 0.25
    model = make_unet()
    dp = make_dp(
        model,
        mode=mode,
        per_example_loss=zero_loss,
        noise_multiplier=sigma,
        max_grad_norm=C,
        sample_rate=q,
        num_records=N,
        lr=lr,
    )
    data = make_batch(N, K)
    drifts, sizes = [], []
    for index in PoissonSampler(N, q, torch.Generator().manual_seed(3)):  # 4 steps, B varies
        before = params_of(model)
        sizes.append(dp.step(*(b[index] for b in data)).batch_size)
        drifts.append(params_of(model) - before)
    drift = torch.cat(drifts).double()  # 4 × 41k samples
    expected = sigma * C * lr / (q * N)
    assert abs(drift.std().item() / expected - 1) < 0.02, (drift.std().item(), expected, sizes)
    assert abs(drift.mean().item()) < 5 * expected / math.sqrt(drift.numel())


def _canary_separation(monkeypatch: pytest.MonkeyPatch | None = None, reps: int = 1000) -> float:
    """One noisy step with a canary gradient of norm C present vs absent, `reps` times each: the
    separation of the two output distributions along the canary, in units of their std."""
    sigma, C, d = 2.0, 1.0, 4
    model = nn.Linear(d, 1, bias=False)
    dp = make_dp(
        model,
        per_example_loss=lambda call, x: call(x[None]).sum(),
        noise_multiplier=sigma,
        max_grad_norm=C,
        sample_rate=0.5,
        num_records=8,
        lr=1.0,
        seed=5,
    )
    canary = torch.zeros(1, d)
    canary[0, 0] = C  # gradient of the canary's loss: a fixed vector of norm C; the others are zero
    with_canary, without = torch.cat([canary, torch.zeros(3, d)]), torch.zeros(3, d)
    out: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(reps):
        for present, batch in ((True, with_canary), (False, without)):
            with torch.no_grad():
                model.weight.zero_()
            dp.step(batch)
            out[present].append(-model.weight[0, 0].item())
    a, b = torch.tensor(out[True]), torch.tensor(out[False])
    return ((a.mean() - b.mean()) / torch.cat([a - a.mean(), b - b.mean()]).std()).item()


def _within_what_sigma_allows(separation: float, sigma: float = 2.0) -> bool:
    return separation <= (1 / sigma) * 1.3  # Gaussian mechanism: mean shift C over std σC = 1/σ


def test_canary_audit_separation_matches_sigma() -> None:
    separation = _canary_separation()
    assert _within_what_sigma_allows(separation), separation
    assert separation > 0.5 * 0.7  # and the canary is there at all (it is not clipped away)


def test_canary_audit_catches_noise_divided_by_batch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    add_noise = dpsgd.add_noise

    def broken(sums: list[Tensor], *, noise_std: float, generator: torch.Generator) -> list[Tensor]:
        return add_noise(sums, noise_std=noise_std / 4, generator=generator)  # σ·C/B with B = 4

    monkeypatch.setattr(dpsgd, "add_noise", broken)
    separation = _canary_separation(reps=100)
    assert not _within_what_sigma_allows(separation), separation  # ≈ 4/σ: the audit fails it


# ------------------------------------------------------------------------------------------ sampling


def test_poisson_mask_is_drawn_in_float64() -> None:
    """Each batch is u < q for N float64 uniforms of the run's generator: inclusion probability q up to 2⁻⁵³ (a
    float32 u < q includes a record with probability ⌈q·2²⁴⌉/2²⁴: for q = 64/60000, 1.7e-5 of q above it)."""
    N, q = 60000, 64 / 60000
    got = list(PoissonSampler(N, q, torch.Generator().manual_seed(4)))
    g = torch.Generator().manual_seed(4)
    want = [(torch.rand(N, generator=g, dtype=torch.float64) < q).nonzero().reshape(-1) for _ in range(len(got))]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    g = torch.Generator().manual_seed(4)
    float32 = [(torch.rand(N, generator=g) < q).nonzero().reshape(-1) for _ in range(len(got))]
    assert not all(torch.equal(a, b) for a, b in zip(got, float32, strict=True))  # the test tells them apart
    assert (math.ceil(q * 2**24) / 2**24 - q) / q > 1.6e-5


def test_poisson_batch_sizes_follow_binomial() -> None:
    N, q = 40, 0.1
    sampler = PoissonSampler(N, q, torch.Generator().manual_seed(0))
    assert len(sampler) == 10
    batches = [index for _ in range(300) for index in sampler]
    assert len(batches) == 3000
    sizes = torch.tensor([len(index) for index in batches], dtype=torch.float64)
    assert abs(sizes.mean().item() - N * q) < 4 * math.sqrt(N * q * (1 - q) / len(batches))
    assert abs(sizes.var().item() / (N * q * (1 - q)) - 1) < 0.1
    # chi-square goodness of fit against Binomial(N, q), tail bins merged
    observed = torch.bincount(sizes.long(), minlength=N + 1).double()
    expected = torch.tensor(stats.binom.pmf(range(N + 1), N, q)) * len(batches)
    obs = torch.cat([observed[:9], observed[9:].sum(0, keepdim=True)])
    exp = torch.cat([expected[:9], expected[9:].sum(0, keepdim=True)])
    assert stats.chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3
    # each record is included independently with probability q
    counts = torch.bincount(torch.cat(batches), minlength=N).double()
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3
    for index in batches[:50]:
        assert index.dtype == torch.int64 and torch.equal(index, index.unique())


def test_empty_batches_are_yielded() -> None:
    N, q = 10, 0.05  # P(empty) = 0.95^10 ≈ 0.60
    sampler = PoissonSampler(N, q, torch.Generator().manual_seed(1))
    batches = [index for _ in range(50) for index in sampler]
    empty = sum(len(i) == 0 for i in batches)
    assert len(batches) == 50 * 20
    assert abs(empty / len(batches) - 0.95**N) < 0.05
    assert all(i.shape == (0,) and i.dtype == torch.int64 for i in batches if len(i) == 0)


# ------------------------------------------------------------------------------- steps, state, checks


def test_steps_counts_noisy_steps_taken_including_empty_batches() -> None:
    N, q = 10, 0.1
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 1))
    dp = make_dp(model, per_example_loss=lambda call, x: call(x[None]).sum(), sample_rate=q, num_records=N)
    data = torch.randn(N, 4)
    sizes = []
    for index in PoissonSampler(N, q, torch.Generator().manual_seed(0)):
        before = params_of(model)
        sizes.append(dp.step(data[index]).batch_size)
        assert not torch.equal(params_of(model), before)  # noise was added, even to an empty batch
    assert 0 in sizes and dp.steps == len(sizes) == 10
    stage = dp.stage("discriminator")
    assert (stage.name, stage.mechanism, stage.steps) == ("discriminator", "poisson_gaussian", 10)
    assert (stage.noise_multiplier, stage.sampling_rate, stage.max_grad_norm) == (1.0, q, 1.0)
    assert stage.expected_batch_size == pytest.approx(q * N)

    def failing_step(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("optimizer failed")

    dp.optimizer.step = failing_step  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="optimizer failed"):
        dp.step(data[:2])
    assert dp.steps == 10  # counted only after optimizer.step() ran


def test_same_seed_same_parameters() -> None:
    def run(noise_seed: int) -> Tensor:
        model = make_unet()
        dp = make_dp(model, seed=noise_seed)
        for s in range(3):
            dp.step(*make_batch(3, 2, seed=s))
        return params_of(model)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_state_dict_round_trip() -> None:
    model = nn.Linear(3, 1)
    dp = make_dp(model, per_example_loss=lambda call, x: call(x[None]).sum())
    dp.step(torch.randn(2, 3))
    dp.step(torch.randn(0, 3))
    again = make_dp(nn.Linear(3, 1), per_example_loss=lambda call, x: call(x[None]).sum())
    again.load_state_dict(dp.state_dict())
    assert again.steps == dp.steps == 2 and again.stage("x").steps == 2
    with pytest.raises(ValueError):
        again.load_state_dict({"steps": -1})


def test_a_failed_step_leaves_no_unnoised_gradient() -> None:
    model = nn.Linear(3, 1)
    dp = make_dp(model, per_example_loss=lambda call, x: call(x[None]).sum() * math.nan)
    with pytest.raises(RuntimeError, match="non-finite"):
        dp.step(torch.randn(2, 3))
    assert all(p.grad is None for p in model.parameters()) and dp.steps == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"noise_multiplier": -0.1},
        {"max_grad_norm": 0.0},
        {"max_grad_norm": math.inf},  # with σ > 0
        {"sample_rate": 0.0},
        {"sample_rate": 1.5},
        {"num_records": 0},
        {"mode": "fastest"},
        {"max_physical_batch_size": 0},
    ],
)
def test_invalid_arguments_raise_value_error(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        make_dp(nn.Linear(2, 1), **bad)


def test_batchnorm_and_ragged_batches_are_refused() -> None:
    with pytest.raises(ValueError, match="BatchNorm"):
        make_dp(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    dp = make_dp(make_unet())
    x, y, t, noise = make_batch(3, 2)
    with pytest.raises(ValueError, match="batch size"):
        dp.step(x, y[:2], t, noise)


# ------------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("mode", ["folded", "functorch"])
def test_bf16_autocast_keeps_per_example_gradients_norms_and_clipping_in_float32(mode: str) -> None:
    """Autocast changes the forward and backward only: per-example gradients come back float32, close to the
    float32 ones (bf16's 8-bit mantissa), and every clipped norm is still at most C."""
    model, batch = make_unet(), make_batch(3, 1)
    ref = reference_grads(model, dpdm_loss, batch)
    dp = make_dp(model, mode=mode, max_grad_norm=0.05, autocast_dtype=torch.bfloat16)
    with dp._autocast():
        grads, _ = dp._per_example_grads(*batch)
    assert all(g.dtype == torch.float32 for g in grads)
    sums, norms, factors, _ = dp._clipped_sum(*batch)
    assert all(s.dtype == torch.float32 for s in sums) and norms.dtype == torch.float32
    torch.testing.assert_close(norms, per_example_norms(ref), rtol=0.05, atol=1e-4)
    assert float((norms * factors).max()) <= 0.05 * (1 + 1e-5)


def test_autocast_is_refused_by_the_opacus_modes() -> None:
    with pytest.raises(ValueError, match="autocast runs with modes 'folded' and 'functorch' only"):
        make_dp(make_unet(), mode="hooks", autocast_dtype=torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_dp_step_on_cuda_equals_the_cpu_step(dtype: torch.dtype | None) -> None:
    """The same batch, weights and noise draw: the CUDA step's parameters equal the CPU step's within tolerance
    (bf16: within its precision), and both charge the same stage to the ledger."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    batch = make_batch(8, 2)
    noise = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in
             enumerate(make_unet().parameters())]  # fmt: skip

    def fixed_noise(sums: list[Tensor], *, noise_std: float, generator: torch.Generator) -> list[Tensor]:
        return [s + noise_std * n.to(s.device) for s, n in zip(sums, noise, strict=True)]

    results = {}
    for device in ("cpu", "cuda"):
        model = make_unet().to(device)
        dp = DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), per_example_loss=dpdm_loss,
                   noise_multiplier=1.0, max_grad_norm=0.1, sample_rate=0.5, num_records=16,
                   generator=torch.Generator(device=device).manual_seed(0), mode="folded",
                   autocast_dtype=dtype if device == "cuda" else None)  # fmt: skip
        with patch.object(dpsgd, "add_noise", fixed_noise):
            dp.step(*(b.to(device) for b in batch))
        results[device] = (params_of(model).cpu(), dp.stage("m").to_dict())
    tol = 1e-4 if dtype is None else 2e-2
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], atol=tol, rtol=tol)
    assert results["cuda"][1] == results["cpu"][1]


# ------------------------------------------------------------------- step_outputs: one forward, one backward


def _outputs_case(B: int = 4, K: int = 2, seed: int = 0) -> tuple[tuple[Tensor, ...], Tensor]:
    """UNet inputs per example [B, K, ...] (x_t, t, y) and a fixed per-row target [B, K, 1, 8, 8]."""
    x, y, t, noise = make_batch(B, K, seed)
    a = ALPHA_BAR[t].view(B, K, 1, 1, 1)
    x_t = a.sqrt() * x[:, None] + (1 - a).sqrt() * noise
    return (x_t, t, y[:, None].expand(B, K)), noise


def _nonlinear_loss(out: Tensor, target: Tensor) -> Tensor:
    """A per-example loss of the outputs only [B, K, ...] -> [B] (not linear: o depends on the outputs)."""
    return ((out - target).pow(2) + 0.3 * torch.tanh(out)).flatten(1).mean(1)


def _output_grad(target: Tensor) -> dpsgd.OutputGrad:
    def grad(out: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
        out = out.detach().requires_grad_()
        losses = _nonlinear_loss(out, target[rows])
        (o,) = torch.autograd.grad(losses.sum(), out)
        return o, losses.detach()

    return grad


@pytest.mark.parametrize("mode", ["folded", "functorch"])
def test_step_outputs_per_example_gradients_equal_batch_size_one_reference(mode: str) -> None:
    """g_i = J_iᵀ ∂ℓ_i/∂out_i from one forward: equal to plain autograd of example i's loss alone, for both the
    folded path and the no-graph fallback (surrogate ⟨out, o⟩), and the returned outputs are the model's."""
    model = make_unet()
    inputs, target = _outputs_case()
    B, K = target.shape[:2]

    def loss_of_example(i: int) -> Tensor:
        out = model(*(x[i] for x in inputs))  # example i's K rows alone
        return _nonlinear_loss(out[None], target[i : i + 1])[0]

    params = [p for p in model.parameters()]
    ref = [torch.stack(g) for g in zip(*(torch.autograd.grad(loss_of_example(i), params) for i in range(B)),
                                        strict=True)]  # fmt: skip
    dp = make_dp(model, mode=mode, per_example_loss=dpsgd.output_surrogate, max_grad_norm=math.inf,
                 noise_multiplier=0.0, lr=0.0)  # fmt: skip
    captured: list[list[Tensor]] = []
    real_clip = dp._clip
    with patch.object(dp, "_clip", side_effect=lambda g, losses: (captured.append(g), real_clip(g, losses))[1]):
        stats, out = dp.step_outputs(inputs, _output_grad(target))
    for g, r in zip(captured[0], ref, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        expected = model(*(x.flatten(0, 1) for x in inputs)).view(B, K, 1, 8, 8)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert stats.batch_size == B and dp.steps == 1


def test_step_outputs_without_clipping_and_noise_is_a_plain_step_and_clips_to_C() -> None:
    inputs, target = _outputs_case(B=6)
    plain, private = make_unet(), make_unet()
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    out = plain(*(x.flatten(0, 1) for x in inputs)).view_as(target)
    (_nonlinear_loss(out, target).sum() / 3.0).backward()  # divisor q·N = 0.5 · 6
    opt.step()
    dp = make_dp(private, per_example_loss=dpsgd.output_surrogate, max_grad_norm=math.inf, noise_multiplier=0.0,
                 num_records=6, max_physical_batch_size=4)  # fmt: skip
    dp.step_outputs(inputs, _output_grad(target))
    torch.testing.assert_close(params_of(private), params_of(plain), atol=1e-6, rtol=1e-5)
    clipped = make_dp(make_unet(), per_example_loss=dpsgd.output_surrogate, max_grad_norm=1e-3, noise_multiplier=0.0)
    norms: list[Tensor] = []
    real_clip = clipped._clip

    def spy(g: list[Tensor], losses: Tensor) -> dpsgd.Clipped:
        out = real_clip(g, losses)
        norms.append(out[1] * out[2])  # clipped norms: ‖g_i‖ · factor_i
        return out

    with patch.object(clipped, "_clip", side_effect=spy):
        clipped.step_outputs(inputs, _output_grad(target))
    assert norms[0].max() <= 1e-3 * (1 + 1e-5) and norms[0].min() > 1e-3 * 0.99, "every example is clipped to C"


def test_step_outputs_refuses_a_model_that_mixes_rows_and_needs_the_surrogate() -> None:
    model = MixesRows()
    inputs = (torch.randn(3, 2, 3),)
    target = torch.zeros(3, 2, 1)
    dp = make_dp(model, mode="folded", per_example_loss=dpsgd.output_surrogate)
    with pytest.raises(ValueError, match="mixes"):
        dp.step_outputs(inputs, _output_grad(target))
    assert all(p.grad is None for p in model.parameters()), "no un-noised gradient left behind"
    auto = make_dp(MixesRows(), mode="auto", per_example_loss=dpsgd.output_surrogate)
    with pytest.warns(UserWarning, match="functorch"):
        auto.step_outputs(inputs, _output_grad(target))
    assert auto.mode == "functorch" and auto.steps == 1
    with pytest.raises(ValueError, match="output_surrogate"):
        make_dp(make_unet()).step_outputs(_outputs_case()[0], _output_grad(target))
