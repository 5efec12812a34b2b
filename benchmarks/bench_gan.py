"""GAN baselines: DP-GAN's discriminator DP step vs its non-private step, PATE-GAN's time per iteration, and
GS-WGAN's sanitised generator step vs the same step without clipping and noise.

    .venv/bin/pytest benchmarks/bench_gan.py --benchmark-only -q --benchmark-min-rounds=5 --threads 1

- DP-GAN: one DP-SGD discriminator step (per-example clipping of the whole pair loss, noise, Adam) on
  B real/fake pairs, against the non-private step of the same network: forward + backward + Adam on the
  mean of the same loss over the same 2B rows. The smoke profile's discriminator (width 32), 1×28×28.
- PATE-GAN: one iteration (teacher step, student step with B_s noisy-vote queries, generator step) at
  the smoke profile's settings for k = 10, 50, 100 teachers; teachers as one vmapped network
  ("vmap": stacked parameters, grouped convolutions) or as a Python loop of k modules ("loop").

Times (min and median over rounds) go to each benchmark's extra_info and the summary at the end (for
PATE-GAN there is no non-private reference: compare the "vmap" and "loop" rows' times).
"""

from __future__ import annotations

import dataclasses
import tomllib
from importlib.resources import files
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from bench.baselines.dpgan import DPGAN
from bench.baselines.dpgan import Config as DPGANConfig
from bench.baselines.gswgan import GSWGAN
from bench.baselines.gswgan import Config as GSWGANConfig
from bench.baselines.pategan import PATEGAN
from bench.baselines.pategan import Config as PATEGANConfig

from bench.contract import DataSpec, ImageDataset
from bench.privacy.dpsgd import DPSGD

N = 60_000
SPEC = DataSpec(channels=1, height=28, width=28, num_classes=10, num_train=N)
SMOKE = tomllib.loads(files("bench.grid.profiles").joinpath("smoke.toml").read_text())
BATCH = 128


def _config(cls: type, table: str, **override: Any) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    smoke = {k: tuple(v) if isinstance(v, list) else v for k, v in SMOKE[table].items() if k in names}
    return cls(**(smoke | override))


def _pairs(latent_dim: int, g: DPGAN) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 1, 28, 28, generator=gen) * 2 - 1
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    with torch.no_grad():
        fake = g.G(torch.randn(BATCH, latent_dim, generator=gen), y)
    return x, y, fake, torch.rand(BATCH, generator=gen)


DPGAN_MODES = ("non-private", "folded", "functorch", "hooks")


@pytest.mark.parametrize("mode", DPGAN_MODES)
@pytest.mark.parametrize("loss", ["ns", "wgan-gp"])
def test_dpgan_discriminator_step(benchmark: Any, ratios: Any, loss: str, mode: str) -> None:
    if loss == "wgan-gp" and mode in ("folded", "hooks"):
        pytest.skip("the gradient penalty needs a double backward: functorch only")
    torch.manual_seed(0)
    cfg = _config(DPGANConfig, "dpgan", loss=loss, dp_mode="functorch" if loss == "wgan-gp" else "auto")
    method = DPGAN(cfg, spec=SPEC, device=torch.device("cpu"))
    batch = _pairs(cfg.latent_dim, method)
    opt = torch.optim.Adam(method.D.parameters(), lr=2e-4)
    if mode == "non-private":
        x, y, fake, a = batch

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            if loss == "ns":
                logits = method.D(torch.cat([x, fake]), torch.cat([y, y]))  # the same 2B rows
                F.softplus(-logits[:BATCH]).add(F.softplus(logits[BATCH:])).mean().backward()
            else:
                x_hat = (a.view(-1, 1, 1, 1) * x + (1 - a.view(-1, 1, 1, 1)) * fake).requires_grad_()
                logits = method.D(torch.cat([x, fake]), torch.cat([y, y]))
                (grad,) = torch.autograd.grad(method.D(x_hat, y).sum(), x_hat, create_graph=True)
                penalty = ((grad.flatten(1).pow(2).sum(1) + 1e-12).sqrt() - 1).pow(2)
                (logits[BATCH:] - logits[:BATCH] + cfg.gp_weight * penalty).mean().backward()
            opt.step()

        benchmark(step)
    else:
        dp = DPSGD(
            method.D,
            opt,
            per_example_loss=method._d_loss,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            sample_rate=BATCH / N,
            num_records=N,
            generator=torch.Generator().manual_seed(1),
            mode=mode,
        )
        benchmark(dp.step, *batch)
    case = f"dpgan-{loss}-w{cfg.width}-B{BATCH}"
    benchmark.extra_info.update(case=case, mode=mode, batch=BATCH, threads=torch.get_num_threads())
    ratios.record(benchmark, case, mode)


@pytest.fixture(scope="module")
def fmnist_like() -> ImageDataset:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, 1, 28, 28), generator=gen, dtype=torch.uint8)
    return ImageDataset(images, torch.randint(0, 10, (N,), generator=gen), 10, "random")


@pytest.mark.parametrize("teachers", ["vmap", "loop"])
@pytest.mark.parametrize("k", [10, 50, 100])
def test_pategan_iteration(
    benchmark: Any, ratios: dict[str, dict[str, Any]], fmnist_like: ImageDataset, k: int, teachers: str
) -> None:
    cfg = _config(PATEGANConfig, "pategan", teachers=k, teacher_batching=teachers)
    method = PATEGAN(cfg, spec=SPEC, device=torch.device("cpu"))
    method._prepare(fmnist_like, torch.Generator().manual_seed(0))
    method.noise_scale = 100.0  # any scale: the cost does not depend on it
    method._iteration()  # warm-up
    benchmark.pedantic(method._iteration, rounds=5, iterations=1)
    case = f"pategan-k{k}"
    benchmark.extra_info.update(case=case, teachers=teachers, k=k, threads=torch.get_num_threads())
    if benchmark.stats is None:
        return
    stats = benchmark.stats.stats
    rows = ratios.setdefault(case, {})
    rows[teachers] = (stats.min, stats.median)
    if "loop" in rows and "vmap" in rows:  # loop time ÷ vmap time
        benchmark.extra_info.update(loop_over_vmap_min=rows["loop"][0] / rows["vmap"][0])


@pytest.mark.parametrize("mode", ["non-private", "sanitised"])
def test_gswgan_generator_step(benchmark: Any, ratios: Any, fmnist_like: ImageDataset, mode: str) -> None:
    """GS-WGAN's generator step (B fakes, the gradient w.r.t. each image from one discriminator, Adam on G) with the
    per-image clipping and noise (`sanitised`) against the same step without them (the smoke profile's networks)."""
    cfg = _config(GSWGANConfig, "gswgan")
    method = GSWGAN(cfg, spec=SPEC, device=torch.device("cpu"))
    method._prepare(fmnist_like, torch.Generator().manual_seed(0))
    method.sigma = 10.0  # any σ: the cost does not depend on it
    private = mode == "sanitised"
    method._generator_step(0, private=private)  # warm-up
    benchmark(method._generator_step, 0, private=private)
    case = f"gswgan-{cfg.gen_arch}-md{cfg.model_dim}-B{cfg.batch_size}"
    benchmark.extra_info.update(case=case, mode=mode, threads=torch.get_num_threads())
    ratios.record(benchmark, case, mode)
