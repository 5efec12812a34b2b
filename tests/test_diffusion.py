from __future__ import annotations

import pytest
import torch

from bench.diffusion import EMA, Schedule, ddim_sample, multiplicity_loss, q_sample
from bench.nets.unet import UNet, UNetConfig
from bench.pixels import to_model_range, to_uint8


def test_schedule_matches_ddpm() -> None:
    s = Schedule(T=1000)
    ab = s.alpha_bar()
    assert ab.shape == (1000,)
    assert ab[0].item() == pytest.approx(1 - 1e-4)
    assert ab[-1].item() == pytest.approx(4.035e-5, rel=1e-2)  # DDPM's linear schedule ends near 4e-5
    assert bool((ab[1:] < ab[:-1]).all())
    with pytest.raises(ValueError, match="T must be"):
        Schedule(T=1)


def test_q_sample_moments() -> None:
    ab = Schedule(T=10).alpha_bar()
    x0 = torch.ones(20000, 1, 1, 1)
    t = torch.full((20000,), 9)
    xt = q_sample(x0, t, torch.randn(20000, 1, 1, 1, generator=torch.Generator().manual_seed(0)), ab)
    assert xt.mean().item() == pytest.approx(ab[9].sqrt().item(), abs=0.02)
    assert xt.var().item() == pytest.approx(1 - ab[9].item(), abs=0.02)


def test_uint8_round_trip() -> None:
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(to_uint8(to_model_range(x)), x)


def test_multiplicity_loss_is_mean_over_k() -> None:
    net = UNet(UNetConfig(base_channels=8, groups=4, num_classes=3)).eval()
    ab = Schedule(T=20).alpha_bar()
    g = torch.Generator().manual_seed(0)
    x0, y = torch.rand(1, 8, 8, generator=g) * 2 - 1, torch.tensor(1)
    t, noise = torch.randint(0, 20, (4,), generator=g), torch.randn(4, 1, 8, 8, generator=g)
    per_draw = [multiplicity_loss(net, x0, y, t[k : k + 1], noise[k : k + 1], ab) for k in range(4)]
    assert multiplicity_loss(net, x0, y, t, noise, ab).item() == pytest.approx(
        torch.stack(per_draw).mean().item(), rel=1e-5
    )


def test_ddim_with_perfect_denoiser_recovers_x0() -> None:
    s = Schedule(T=100)
    target = torch.full((2, 1, 4, 4), 0.5)
    ab = s.alpha_bar()

    def oracle(x, t, y):  # the exact ε for data concentrated on `target`
        a = ab[t].reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    x = ddim_sample(oracle, (2, 1, 4, 4), None, s, torch.Generator().manual_seed(0), torch.device("cpu"), steps=10)
    assert torch.allclose(x, target, atol=1e-4)


def test_ema_moves_toward_parameters() -> None:
    net = torch.nn.Linear(2, 1)
    ema = EMA(net, 0.9)
    with torch.no_grad():
        net.weight.add_(1.0)
    before = ema.model.weight.clone()
    ema.update(net)
    assert torch.allclose(ema.model.weight, before + 0.1, atol=1e-6)


def test_unet_has_no_batchnorm_and_keeps_shape() -> None:
    for mults in [(1, 2), (1, 2, 2)]:
        net = UNet(UNetConfig(base_channels=8, channel_mults=mults, groups=4, num_classes=10))
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
        x = torch.randn(3, 1, 28, 28)
        assert net(x, torch.tensor([0, 5, 9]), torch.tensor([0, 1, 2])).shape == x.shape
