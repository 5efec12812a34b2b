"""DP-SAD: student step throughput vs a non-private distillation step of the same networks, and the time
per epoch of each stage in the smoke profile.

    .venv/bin/pytest benchmarks/bench_dpsad.py --benchmark-only -q --benchmark-min-rounds=5 [--threads 1]
    .venv/bin/pytest benchmarks/bench_dpsad.py --benchmark-only -q -k interleaved --threads 1   # the ratios
    BENCH_DPSAD_DATASET=fmnist .venv/bin/pytest benchmarks/bench_dpsad.py -q -s -k epoch   # seconds per epoch

Step benchmark, for each denoiser: the smoke profile's networks on 1×28×28, batch 128 (edm: NCSN++ nf 8 with
attention at 7×7, ~81k parameters, as dpdm's smoke network; ddpm: the paper's UNet at 41k). Every variant starts
from the same draws and teacher output (the teacher's forward is the same in all and outside the per-example
gradient) and excludes the discriminator's own update (the same in all); what differs is how the student's
gradient is formed:

    non-private      student forward + backward through the discriminator on the mean loss, Adam step
    params           dpsad: DPSGD.step_outputs ("folded"): ONE student forward whose outputs give o_i through the
                     discriminator (batched) and whose backward with o_i gives the per-example gradients J_iᵀ o_i;
                     clip, noise, Adam step (the shipped path)
    output           dpsad clip_target="output": the same forward, o_i clipped and noised, one backward
    direct-functorch the whole loss (student, discriminator) inside torch.func vmap(grad): the obvious
                     implementation the output-gradient path replaces
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
import torch
from bench.methods.dpsad_common import OutputClipStep

from bench import config, data
from bench.grid import registry
from bench.privacy import Budget
from bench.privacy.dpsgd import DPSGD

BATCH, NUM_RECORDS = 128, 60_000
VARIANTS = ("non-private", "params", "output", "direct-functorch")  # the reference first: ratios need it
DENOISERS = {"edm": {}, "ddpm": {"denoiser": "ddpm", "base_channels": 8, "channel_mults": [1, 2],
                                 "num_res_blocks": 1, "groups": 4, "teacher_channel_mults": [1, 2],
                                 "sampler": "ddim", "label_dropout": 0.0}}  # fmt: skip


def smoke_method(name: str, dataset: str = "fmnist", **sets: Any) -> Any:
    cls = registry.get(name)
    cfg, _ = config.resolve(
        cls.Config, profile=config.load_profile("smoke"), method=name, dataset=dataset, epsilon=10.0, sets=sets
    )
    return cls(cfg, spec=data.spec(dataset), device=torch.device("cpu"))


def make_draws(method: Any) -> tuple[Any, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(BATCH, 1, 28, 28, generator=g) * 2 - 1
    y = torch.randint(0, 10, (BATCH,), generator=g)
    d = method.draw(x0, y, g)
    return d, method.outputs(method.teacher_ema.model, d)


def make_step(variant: str, denoiser: str) -> Any:
    """One student step of `variant` on the smoke networks of `denoiser`, from fixed draws."""
    torch.manual_seed(0)
    method = smoke_method("dpsad", clip_target="output" if variant == "output" else "params", **DENOISERS[denoiser])
    d, out_T = make_draws(method)
    opt = torch.optim.Adam(method.net.parameters(), lr=1e-3)
    q, gen = BATCH / NUM_RECORDS, torch.Generator().manual_seed(1)

    if variant == "non-private":

        def step() -> None:
            method.distillation_step(opt, d, out_T, divisor=BATCH)

    elif variant in ("params", "output"):
        dp: Any = (
            method._student_dp(opt, 1.0, q, NUM_RECORDS, gen)
            if variant == "params"
            else OutputClipStep(method, opt, sigma_eff=1.0, C=1.0, q=q, n=NUM_RECORDS, generator=gen)
        )
        dp_inputs = method.net_inputs(d)

        def step() -> None:
            dp.step_outputs(dp_inputs, method.output_grads(out_T, d))

    else:
        method.disc.requires_grad_(False)  # frozen before torch.func, which refuses toggling inside
        from bench.methods.dpsad_common import Draw

        def whole_loss(model_call: Any, x: Any, s: Any, y: Any, *draw: Any) -> Any:  # ONE example's loss
            y_in, y_true, level, x_in, target, o_T = (t[None] for t in draw)
            one = Draw(y_in, y_true, level, x_in, target)
            return method.losses(method.assemble(model_call(x, s, y)[None], one), o_T, one)[0]

        dp = DPSGD(method.net, opt, per_example_loss=whole_loss, noise_multiplier=1.0, max_grad_norm=1.0,
                   sample_rate=q, num_records=NUM_RECORDS, generator=gen, mode="functorch")  # fmt: skip
        batch = (*method.net_inputs(d), d.y, d.y_true, d.level, d.x, d.target, out_T)

        def step() -> None:
            dp.step(*batch)

    return step


@pytest.mark.parametrize("denoiser", DENOISERS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_student_step_throughput(
    benchmark: Any, ratios: dict[str, dict[str, Any]], variant: str, denoiser: str
) -> None:
    benchmark(make_step(variant, denoiser))
    benchmark.extra_info.update(variant=variant, batch=BATCH, threads=torch.get_num_threads())
    if benchmark.stats is None:  # --benchmark-disable
        return
    stats = benchmark.stats.stats
    rows = ratios.setdefault(f"{denoiser}-28x28-B{BATCH}", {})
    rows[variant] = (stats.min, stats.median)
    if "non-private" in rows:
        ref_min, ref_med = rows["non-private"]
        benchmark.extra_info.update(ratio_min=ref_min / stats.min, ratio_median=ref_med / stats.median)


INTERLEAVED = ("non-private", "params", "output")
ROUNDS = int(os.environ.get("BENCH_DPSAD_ROUNDS", "30"))


@pytest.mark.parametrize("denoiser", DENOISERS)
def test_student_step_ratios_interleaved(benchmark: Any, ratios: dict[str, dict[str, Any]], denoiser: str) -> None:
    """The same steps as above, one of each variant a round (non-private, params, output), ROUNDS rounds after 3
    of warm-up: a drift of the machine's speed (a shared VM's neighbours) then slows every variant alike, where
    the sequential benchmark above gives all of one variant's rounds before the next's."""
    steps = {v: make_step(v, denoiser) for v in INTERLEAVED}
    times: dict[str, list[float]] = {v: [] for v in INTERLEAVED}

    def one_round() -> None:
        for v, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[v].append(time.perf_counter() - t0)

    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=3, iterations=1)
    rows = ratios.setdefault(f"{denoiser}-interleaved", {})
    for v, ts in times.items():
        kept = sorted(ts[-ROUNDS:])
        rows[v] = (kept[0], kept[len(kept) // 2])


class _Timer:
    """A Progress that timestamps every advance(), one list per start() (dpsad: its shared teacher's steps, then its
    student's; dpsad-e2e: one list, teacher steps then student steps). Its `shared` builds the stage here."""

    def __init__(self) -> None:
        self.stages: list[list[float]] = []

    def start(self, total: int, description: str = "") -> None:
        self.stages.append([time.perf_counter()])

    def advance(self, n: int = 1) -> None:
        if n:
            self.stages[-1].append(time.perf_counter())

    def resume(self) -> None:
        return None

    def checkpoint(self, state_fn: Any) -> None:
        pass

    def shared(self, name: str, ident: Any, build: Any) -> Any:
        return build(self)


@pytest.mark.parametrize("name", ["dpsad", "dpsad-e2e"])
def test_seconds_per_epoch_of_each_stage(monkeypatch: Any, name: str) -> None:
    """A shortened smoke fit (10 steps a stage); seconds per epoch = mean step time × steps per epoch."""
    dataset = os.environ.get("BENCH_DPSAD_DATASET", "fmnist")
    train = data.load(dataset, "train")
    method = smoke_method(name, dataset)
    cfg, n = method.config, len(train)
    k = 10
    bs = min(cfg.teacher_batch_size, n)
    sets = {"teacher_epochs": k * bs / n, "epochs": k * cfg.batch_size / n}
    per_epoch = {"teacher": n / bs, "student (incl. discriminator)": n / cfg.batch_size}
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
    stamps = [t for stage in timer.stages for t in stage]
    dt = [b - a for stage in timer.stages for a, b in zip(stage, stage[1:], strict=False)]
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
    assert len(dt) == 2 * k and len(stamps) > 2 * k
