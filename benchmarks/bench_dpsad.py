"""DP-SAD: student step throughput vs a non-private distillation step of the same networks, and the time
per epoch of each stage in the smoke profile.

    .venv/bin/pytest benchmarks/bench_dpsad.py --benchmark-only -q --benchmark-min-rounds=5 [--threads 1]
    BENCH_DPSAD_DATASET=fmnist .venv/bin/pytest benchmarks/bench_dpsad.py -q -s -k epoch   # seconds per epoch

Step benchmark: the smoke profile's networks (student and teacher UNet 41k parameters, discriminator 8
channels, 2 levels) on 1×28×28, batch 128. Every variant starts from the same teacher output (the
teacher's forward is the same in all and outside the per-example gradient) and excludes the
discriminator's own update (the same in all); what differs is how the student's gradient is formed:

    non-private      student forward + backward through the discriminator on the mean loss, Adam step
    params           dpsad: student forward (no graph), output gradient o_i through the discriminator
                     (batched), then DPSGD "folded" on the surrogate ⟨ε_θ(x_r), o_i⟩ (the shipped path)
    output           dpsad clip_target="output": o_i clipped and noised, one backward through the student
    direct-functorch the whole loss (student, discriminator) inside torch.func vmap(grad): the obvious
                     implementation the surrogate replaces
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import torch
from bench.methods.dpsad_common import OutputClipStep

from bench import config, data, registry
from bench.dpsgd import DPSGD
from bench.privacy import Budget

BATCH, NUM_RECORDS = 128, 60_000
VARIANTS = ("non-private", "params", "output", "direct-functorch")  # the reference first: ratios need it
CASE = "smoke-nets-28x28-B128"


def smoke_method(name: str, dataset: str = "fmnist", **sets: Any) -> Any:
    cls = registry.get(name)
    cfg, _ = config.resolve(
        cls.Config, profile=config.load_profile("smoke"), method=name, dataset=dataset, epsilon=10.0, sets=sets
    )
    return cls(cfg, spec=data.spec(dataset), device=torch.device("cpu"))


def make_inputs(method: Any) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(BATCH, 1, 28, 28, generator=g) * 2 - 1
    y = torch.randint(0, 10, (BATCH,), generator=g)
    r, eps, x_r = method.draw(x0, g)
    e_T = method.outputs(method.teacher_ema.model, x_r, r, y)
    return x_r, r, y, eps, e_T


@pytest.mark.parametrize("variant", VARIANTS)
def test_student_step_throughput(benchmark: Any, ratios: dict[str, dict[str, Any]], variant: str) -> None:
    torch.manual_seed(0)
    method = smoke_method("dpsad", clip_target="output" if variant == "output" else "params")
    x_r, r, y, eps, e_T = make_inputs(method)
    opt = torch.optim.Adam(method.net.parameters(), lr=1e-3)
    q, gen = BATCH / NUM_RECORDS, torch.Generator().manual_seed(1)

    if variant == "non-private":

        def step() -> None:
            e = method.net(x_r.flatten(0, 1), r.flatten(), y.repeat_interleave(r.shape[1])).view_as(x_r)
            opt.zero_grad(set_to_none=True)
            method.losses(e, e_T, eps, x_r, r, y).mean().backward()
            opt.step()

    elif variant in ("params", "output"):
        dp: Any = (
            method._student_dp(opt, 1.0, q, NUM_RECORDS, gen)
            if variant == "params"
            else OutputClipStep(method, opt, sigma_eff=1.0, C=1.0, q=q, n=NUM_RECORDS, generator=gen)
        )

        def step() -> None:
            e_S = method.outputs(method.net, x_r, r, y)
            dp.step(x_r, r, y, method.output_grads(e_S, e_T, eps, x_r, r, y))

    else:
        method.disc.requires_grad_(False)  # frozen before torch.func, which refuses toggling inside

        def whole_loss(model_call: Any, x_r: Any, r: Any, y: Any, eps: Any, e_T: Any) -> Any:
            e = model_call(x_r, r, y.expand(r.shape[0]))
            return method.losses(e[None], e_T[None], eps[None], x_r[None], r[None], y[None])[0]

        dp = DPSGD(
            method.net,
            opt,
            per_example_loss=whole_loss,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            sample_rate=q,
            num_records=NUM_RECORDS,
            generator=gen,
            mode="functorch",
        )

        def step() -> None:
            dp.step(x_r, r, y, eps, e_T)

    benchmark(step)
    benchmark.extra_info.update(variant=variant, batch=BATCH, threads=torch.get_num_threads())
    if benchmark.stats is None:  # --benchmark-disable
        return
    stats = benchmark.stats.stats
    rows = ratios.setdefault(CASE, {})
    rows[variant] = (stats.min, stats.median)
    if "non-private" in rows:
        ref_min, ref_med = rows["non-private"]
        benchmark.extra_info.update(ratio_min=ref_min / stats.min, ratio_median=ref_med / stats.median)


class _Timer:
    """A Progress that timestamps every advance() (one per teacher step, then one per student step)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def start(self, total: int, description: str = "") -> None:
        self.stamps = [time.perf_counter()]

    def advance(self, n: int = 1) -> None:
        if n:
            self.stamps.append(time.perf_counter())

    def resume(self) -> None:
        return None

    def checkpoint(self, state_fn: Any) -> None:
        pass


@pytest.mark.parametrize("name", ["dpsad", "dpsad-e2e"])
def test_seconds_per_epoch_of_each_stage(monkeypatch: Any, name: str) -> None:
    """A shortened smoke fit (10 steps a stage); seconds per epoch = mean step time × steps per epoch."""
    dataset = os.environ.get("BENCH_DPSAD_DATASET", "fmnist")
    train = data.load(dataset, "train")
    method = smoke_method(name, dataset)
    cfg, n = method.config, len(train)
    k = 10
    if name == "dpsad":
        bs = min(cfg.teacher_batch_size, n)
        sets = {"teacher_epochs": k * bs / n, "epochs": k * cfg.batch_size / n}
        per_epoch = {"teacher": n / bs, "student (incl. discriminator)": n / cfg.batch_size}
    else:
        sets = {"teacher_epochs": k * cfg.teacher_batch_size / n, "epochs": k * cfg.batch_size / n}
        per_epoch = {"teacher": n / cfg.teacher_batch_size, "student (incl. discriminator)": n / cfg.batch_size}
    method = smoke_method(name, dataset, **sets)
    disc_time: list[float] = []
    real_step = DPSGD.step

    def timed(self: DPSGD, *batch: torch.Tensor) -> Any:
        t0 = time.perf_counter()
        out = real_step(self, *batch)
        if self.model is method.disc:
            disc_time.append(time.perf_counter() - t0)
        return out

    monkeypatch.setattr(DPSGD, "step", timed)
    timer = _Timer()
    budget = Budget.for_records(10.0, n)
    method.fit(train, budget=budget, generator=torch.Generator().manual_seed(0), progress=timer)
    dt = [b - a for a, b in zip(timer.stamps, timer.stamps[1:], strict=False)]
    teacher, student = dt[:k], dt[k:]
    lines = [f"{name} on {dataset} ({n} records), smoke profile, {torch.get_num_threads()} torch threads:"]
    for stage, times in (("teacher", teacher), ("student (incl. discriminator)", student)):
        step = sum(times[1:]) / max(1, len(times) - 1)  # the first step of a stage warms up
        lines.append(f"  {stage:<32} {step * 1e3:8.1f} ms/step  {step * per_epoch[stage]:8.1f} s/epoch")
    if disc_time:
        d = sum(disc_time[1:]) / max(1, len(disc_time) - 1)
        lines.append(
            f"  {'  of which DP discriminator':<32} {d * 1e3:8.1f} ms/step  "
            f"{d * n / cfg.disc_batch_size:8.1f} s/epoch (at its own q)"
        )
    print("\n".join(lines))
    assert len(dt) == 2 * k
