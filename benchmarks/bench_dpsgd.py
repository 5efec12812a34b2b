"""Throughput of one DP-SGD step (each mode) vs the non-private step of the same network and batch: our small
DDPM UNet and a small NCSN++ (DPDM's network: its three levels and attention at 7×7, nf 8, one block).

    .venv/bin/pytest benchmarks/bench_dpsgd.py --benchmark-only -q --benchmark-min-rounds=5

The non-private step is forward + backward + optimizer step on the mean loss over the same B·K rows.
Ratios (min and median over rounds) go to each benchmark's extra_info and a summary at the end.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

from bench.nets.ncsnpp import NCSNpp, NCSNppConfig
from bench.nets.unet import UNet, UNetConfig
from bench.privacy.dpsgd import DPSGD

NETWORKS = {
    "unet41k": lambda: UNet(UNetConfig(base_channels=8, channel_mults=(1, 2), groups=4)),  # 40,841 parameters
    "ncsnpp81k": lambda: NCSNpp(
        NCSNppConfig(nf=8, ch_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(7,))
    ),  # 80,505 parameters
}
BATCH, NUM_RECORDS, T, CLASSES = 128, 60_000, 1000, 10
CASES = {  # case: (network, K, modes)
    "unet41k-28x28-B128-K1": ("unet41k", 1, ("folded", "functorch", "hooks", "ghost")),
    "unet41k-28x28-B128-K4": ("unet41k", 4, ("folded", "functorch", "hooks")),
    "ncsnpp81k-28x28-B128-K1": ("ncsnpp81k", 1, ("folded", "functorch")),
    "ncsnpp81k-28x28-B128-K4": ("ncsnpp81k", 4, ("folded",)),
}
MODES = ("non-private", "folded", "functorch", "hooks", "ghost")  # the reference first: ratios need it
ALPHA_BAR = torch.linspace(0.9999, 0.01, T)


def denoising_loss(model_call: Any, x: Tensor, y: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """DPDM-style loss of ONE example over its K draws: x [C,H,W], y [], t [K], noise [K,C,H,W]."""
    a = ALPHA_BAR[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x + (1 - a).sqrt() * noise
    return (model_call(x_t, t.float(), y.expand(t.shape[0])) - noise).pow(2).mean()


def make_batch(K: int) -> tuple[Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 1, 28, 28, generator=g) * 2 - 1
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    t = torch.randint(0, T, (BATCH, K), generator=g)
    return x, y, t, torch.randn(BATCH, K, 1, 28, 28, generator=g)


def non_private_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[Tensor, ...]) -> None:
    x, y, t, noise = batch
    K = t.shape[1]
    a = ALPHA_BAR[t.flatten()].view(-1, 1, 1, 1)
    rows = noise.flatten(0, 1)  # the same B·K forwards as the DP step
    x_t = a.sqrt() * x.repeat_interleave(K, 0) + (1 - a).sqrt() * rows
    optimizer.zero_grad(set_to_none=True)
    (model(x_t, t.flatten().float(), y.repeat_interleave(K)) - rows).pow(2).mean().backward()
    optimizer.step()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_step_throughput(benchmark: Any, ratios: Any, case: str, mode: str) -> None:
    network, K, modes = CASES[case]
    if mode != "non-private" and mode not in modes:
        pytest.skip(f"{mode} is not timed for {case} (ghost: per-row norms, K = 1 only; slow modes left out)")
    torch.manual_seed(0)
    model = NETWORKS[network]()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    batch = make_batch(K)
    if mode == "non-private":
        benchmark(non_private_step, model, optimizer, batch)
    else:
        dp = DPSGD(
            model,
            optimizer,
            per_example_loss=denoising_loss,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            sample_rate=BATCH / NUM_RECORDS,
            num_records=NUM_RECORDS,
            generator=torch.Generator().manual_seed(1),
            mode=mode,
        )
        benchmark(dp.step, *batch)
    benchmark.extra_info.update(case=case, mode=mode, K=K, batch=BATCH, threads=torch.get_num_threads())
    ratios.record(benchmark, case, mode)
