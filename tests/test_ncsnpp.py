"""NCSN++ as DPDM uses it (bench/nets/ncsnpp.py), checked against nv-tlabs/DPDM@29bb94d (full hash in the module).

The reference cannot be imported here (not vendored), so it was run once in a scratch copy: model/*.py of
nv-tlabs/DPDM@29bb94d92bb5440a664dbaa915c06a7397ea9ff3, with the opacus grad-sampler registration at the end
of model/layers.py and the CUDA ops package model/op (only used with fir=True) stubbed out, building
NCSNpp(**config.model.network) of each config. Findings (torch 2.14.1, CPU, float32):

  - parameter counts equal: fmnist_28 / mnist_28 1,753,345; cifar10_32 1,754,499; celeba_32 1,804,451;
    celeba_64 1,999,907; imagenet_32 1,836,483 (REFERENCE_PARAMETERS below);
  - from the same torch.manual_seed, the initial weights are bit-identical (parameters in the same order,
    NIN W [in, out] compared with our 1×1 conv weight [out, in, 1, 1] transposed), for all five configs;
  - with the same random N(0, 0.2²) weights (reference state_dict mapped onto ours in order, NIN W -> Wᵀ),
    eval-mode outputs on random inputs (batch 3) differ by at most 1.4e-6 (max |out| ~1-1.7): fmnist_28
    8.8e-7, cifar10_32 1.4e-6, celeba_32 1.2e-6, celeba_64 1.1e-6, imagenet_32 8.8e-7; our y=None vs the reference's
    y = label_dim: 9.5e-7; on the TINY config below (init_scale 1), parameter gradients of sum(out²) agree
    to 2.6e-6 absolute (max |grad| 45);
  - the reference has AttnBlockpp modules: fmnist_28 4 (2 down at 7×7, 1 middle, 1 up at 7×7),
    cifar10_32 4, celeba_32 7, celeba_64 7, imagenet_32 7; ours the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from bench.nets.ncsnpp import AttnBlock, NCSNpp, NCSNppConfig, ResBlock, count_parameters, reference_config
from bench.privacy.dpsgd import DPSGD

# nv-tlabs/DPDM@29bb94d: sum(p.numel() for p in NCSNpp(**config.model.network).parameters()), the
# network of configs/<name>/train_eps_*.yaml, counted by instantiating the reference (module docstring)
REFERENCE_PARAMETERS = {
    "fmnist_28": 1_753_345,
    "mnist_28": 1_753_345,
    "cifar10_32": 1_754_499,
    "celeba_32": 1_804_451,
    "celeba_64": 1_999_907,
    "imagenet_32": 1_836_483,
}
# reference AttnBlockpp count of each config's network
REFERENCE_ATTENTION = {"fmnist_28": 4, "cifar10_32": 4, "celeba_32": 7, "celeba_64": 7, "imagenet_32": 7}

TINY = NCSNppConfig(
    image_size=8, nf=8, ch_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_classes=3, init_scale=1.0
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is faster


def make(config: NCSNppConfig = TINY, seed: int = 0) -> NCSNpp:
    torch.manual_seed(seed)
    return NCSNpp(config)


def inputs(config: NCSNppConfig, B: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, config.in_channels, config.image_size, config.image_size, generator=g)
    return x, torch.randn(B, generator=g), torch.randint(0, max(config.num_classes, 1), (B,), generator=g)


# ------------------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMETERS))
def test_parameter_count_equals_the_reference(name: str) -> None:
    assert count_parameters(NCSNpp(reference_config(name))) == REFERENCE_PARAMETERS[name]


def test_attention_exactly_at_the_configured_resolutions() -> None:
    model = NCSNpp(reference_config("fmnist_28"))
    assert sum(isinstance(m, AttnBlock) for m in model.modules()) == REFERENCE_ATTENTION["fmnist_28"]
    assert sum(isinstance(m, AttnBlock) for m in model.down[2].modules()) == 2  # 7×7: one per residual block
    assert [sum(isinstance(m, AttnBlock) for m in level.modules()) for level in model.down[:2]] == [0, 0]
    assert [level.attn is not None for level in model.up] == [True, False, False]  # up path: 7, 14, 28
    assert isinstance(model.mid_attn, AttnBlock)
    assert sum(isinstance(m, ResBlock) for m in model.modules()) == 3 * 2 + 2 + 2 + 3 * 3 + 2
    for name, count in REFERENCE_ATTENTION.items():
        assert sum(isinstance(m, AttnBlock) for m in NCSNpp(reference_config(name)).modules()) == count


def test_output_is_near_zero_at_initialisation_with_init_scale_zero() -> None:
    """init_scale 0 = variance scale 1e-10 on each block's last conv and conv_out: weights ~1e-5 of the usual,
    so the output is ~1e-5, not exactly 0 (the reference's fmnist_28 network at init: max |out| 3.5e-5)."""
    config = NCSNppConfig(image_size=8, nf=8, ch_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,))
    x, c_noise, y = inputs(config, 2)
    with torch.no_grad():
        out = make(config)(x, c_noise, y)
        ones = make(dataclasses.replace(config, init_scale=1.0))(x, c_noise, y)
    assert out.shape == x.shape
    assert out.abs().max() < 1e-4
    assert ones.abs().max() > 1e-2


def test_three_channel_32x32_config_runs() -> None:
    config = NCSNppConfig(
        in_channels=3, image_size=32, nf=8, ch_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8, 16)
    )
    model = make(config)
    x, c_noise, y = inputs(config, 2)
    out = model(x, c_noise, y)
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    assert sum(isinstance(m, AttnBlock) for m in model.modules()) == 1 + 1 + 1 + 1 + 1  # 16: 1+1, 8: 1+1, mid
    with pytest.raises(ValueError, match="32x32"):
        model(torch.zeros(1, 3, 28, 28), c_noise[:1], y[:1])


def test_no_label_index_is_used_when_y_is_none() -> None:
    model = make()
    x, c_noise, y = inputs(TINY, 3)
    with torch.no_grad():
        none = model(x, c_noise, None)
        torch.testing.assert_close(none, model(x, c_noise, torch.full((3,), TINY.num_classes)))
        assert not torch.allclose(none, model(x, c_noise, y), atol=1e-4)
    assert model.label_embed is not None and model.label_embed.num_embeddings == TINY.num_classes + 1


def test_unconditional_network_ignores_y() -> None:
    config = NCSNppConfig(
        image_size=8, nf=8, ch_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_classes=0, init_scale=1.0
    )
    model = make(config)
    assert model.label_embed is None
    x, c_noise, y = inputs(config, 2)
    torch.testing.assert_close(model(x, c_noise, None), model(x, c_noise, y))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"image_size": 30}, "divisible by 2"),
        ({"nf": 0}, "nf"),
        ({"ch_mult": ()}, "ch_mult"),
        ({"dropout": 1.0}, "dropout"),
        ({"nf": 6}, "GroupNorm"),  # 6 // 4 = 1 group is fine, but 6 + 12 = 18 channels in 4 groups is not
        ({"attention_resolutions": (5,)}, "attention_resolutions"),
        ({"num_classes": -1}, "num_classes"),
    ],
)
def test_config_validation(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NCSNppConfig(**overrides)


def test_nin_is_a_1x1_conv_and_every_parameter_is_a_folded_layer() -> None:
    model = NCSNpp(reference_config("fmnist_28"))
    known = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.Embedding)
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    assert all(isinstance(m, known) for m in owners)
    attn = model.mid_attn
    assert all(p.kernel_size == (1, 1) for p in (attn.q, attn.k, attn.v, attn.out))


# -------------------------------------------------------------------------------------- row-wise


def test_rows_are_independent() -> None:
    model = make()
    x, c_noise, y = inputs(TINY, 5)
    with torch.no_grad():
        torch.testing.assert_close(model(x[:1], c_noise[:1], y[:1]), model(x, c_noise, y)[:1], atol=1e-6, rtol=1e-5)


def test_dropout_is_random_in_train_mode_only() -> None:
    model = make(dataclasses.replace(TINY, dropout=0.5))
    x, c_noise, y = inputs(TINY, 2)
    with torch.no_grad():
        assert not torch.allclose(model(x, c_noise, y), model(x, c_noise, y))
        model.eval()
        torch.testing.assert_close(model(x, c_noise, y), model(x, c_noise, y))


# --------------------------------------------------------------------------------------------- DP-SGD


def edm_loss(model_call: Callable[..., Tensor], x: Tensor, y: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
    """DPDM-like (EDM preconditioning): x [C,H,W], y [], sigma [K], noise [K,C,H,W] -> loss averaged over K."""
    s = sigma.view(-1, 1, 1, 1)
    c_in = 1 / (s**2 + 0.5).sqrt()
    out = model_call(c_in * (x + s * noise), 0.25 * sigma.log(), y.expand(sigma.shape[0]))
    return (out - noise).pow(2).mean()


def reference_grads(model: nn.Module, batch: tuple[Tensor, ...]) -> list[Tensor]:
    """Batch size 1, plain autograd, one example at a time -> [B, *p.shape] per parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = [torch.autograd.grad(edm_loss(model, *(b[i] for b in batch)), params) for i in range(len(batch[0]))]
    return [torch.stack(g) for g in zip(*rows, strict=True)]


@pytest.mark.parametrize("mode", ["auto", "folded", "functorch"])
def test_per_example_gradients_equal_batch_size_one_reference(mode: str) -> None:
    B, K = 3, 2
    model = make()
    x, _, y = inputs(TINY, B)
    g = torch.Generator().manual_seed(1)
    sigma = (torch.randn(B, K, generator=g) * 1.2 - 1.2).exp()
    batch = (x, y, sigma, torch.randn(B, K, *x.shape[1:], generator=g))
    ref = reference_grads(model, batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    dp = DPSGD(
        model,
        optimizer,
        per_example_loss=edm_loss,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=0.5,
        num_records=8,
        mode=mode,
        generator=torch.Generator().manual_seed(0),
    )
    grads, losses = dp._per_example_grads(*batch)
    assert dp.mode == ("folded" if mode == "auto" else mode)  # auto: every layer is one folded mode knows
    for gr, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(gr, r, atol=1e-5, rtol=1e-5)
    ref_losses = torch.stack([edm_loss(model, *(b[i] for b in batch)) for i in range(B)]).detach()
    torch.testing.assert_close(losses, ref_losses)
