"""DP-SAD specifics: the per-example student gradient, the noisy student step, and what each card charges."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from bench.methods.dpsad_common import (
    DISC_NOT_DP,
    OUTPUT_CLIP_NOT_DP,
    TEACHER_NOT_DP,
    OutputClipStep,
    StudentFit,
)

from bench import config
from bench.contract import NullProgress
from bench.diffusion.edm import loss as edm_loss
from bench.grid import registry
from bench.pixels import to_model_range
from bench.privacy import Budget, BudgetExceeded, PrivacyLedger, epsilon, privacy_card, verify
from bench.privacy.dpsgd import DPSGD
from bench.report.frame import FOOTNOTES, PARTIAL_MARK
from tests.conftest import TINY_PROFILE, bench

CPU = torch.device("cpu")
# dpsad on dpdm's σ-space denoiser at the tiny profile's size (NCSN++ on 16×16: levels 16 and 8)
EDM = {"denoiser": "edm", "sampler": "edm-heun", "sample_steps": 3, "attention_resolutions": [8],
       "teacher_attention_resolutions": [8], "label_dropout": 0.1}  # fmt: skip
DENOISERS = {"ddpm": {}, "edm": EDM}


def build(name: str, train, eps: float = 10.0, **sets):
    cls = registry.get(name)
    cfg, _ = config.resolve(
        cls.Config, profile=config.load_profile(TINY_PROFILE), method=name, dataset="synthetic", epsilon=eps, sets=sets
    )
    return cls(cfg, spec=train.spec, device=CPU)


def fit(method, train, eps: float) -> tuple[PrivacyLedger, Budget]:
    budget = Budget.for_records(eps, len(train))
    ledger = method.fit(train, budget=budget, generator=torch.Generator().manual_seed(0), progress=NullProgress())
    return ledger, budget


def batch_draws(method, train, index: list[int], seed: int, first: tuple | None = None):
    """The Draw of the examples `index` (draws from `seed`; example 0's (label, levels, noise) = `first` if given)."""
    x0, y = to_model_range(train.images[index]), train.labels[index]
    d = method.draw(x0, y, torch.Generator().manual_seed(seed))
    if first is None:
        return d
    y_in, level, noise = d.y.clone(), d.level.clone(), (d.target if method.parameterization == "eps" else None)
    g = torch.Generator().manual_seed(99)
    noise = torch.randn(len(index), d.K, *x0.shape[1:], generator=g)  # fresh noise for all, then example 0's
    y_in[0], level[0], noise[0] = first
    return method.draws_from(x0, y, y_in, level, noise)


def example0_draws(method, train, K: int) -> tuple:
    g = torch.Generator().manual_seed(7)
    d = method.draw(to_model_range(train.images[:1]), train.labels[:1], g)
    noise = torch.randn(1, K, *train.images.shape[1:], generator=g)
    return d.y[0], d.level[0], noise[0]


def per_example_grads(method, dp, d) -> list[torch.Tensor]:
    """The student's per-example gradients of a batch, as its DP step takes them (one forward, one backward)."""
    captured: list[list[torch.Tensor]] = []
    real_clip = dp._clip
    out_T = method.outputs(method.teacher_ema.model, d)
    with patch.object(dp, "_clip", side_effect=lambda g, losses: (captured.append(g), real_clip(g, losses))[1]):
        dp.step_outputs(method.net_inputs(d), method.output_grads(out_T, d))
    return captured[0]


@pytest.mark.parametrize("denoiser", DENOISERS)
@pytest.mark.parametrize("K", [1, 2])
def test_per_example_student_gradient_ignores_the_rest_of_the_batch(train, one_thread, denoiser: str, K: int) -> None:
    method = build("dpsad", train, timesteps_per_example=K, **DENOISERS[denoiser])
    opt = torch.optim.SGD(method.net.parameters(), lr=0.0)
    dp = method._student_dp(opt, 0.0, 0.01, len(train), torch.Generator().manual_seed(0))
    dp.max_grad_norm = math.inf  # the gradients themselves, unclipped
    assert dp.mode == "folded", "teacher and discriminator stay out of the per-example gradient"
    first = example0_draws(method, train, K)  # example 0's draws, the same in every batch
    d1 = batch_draws(method, train, [0, 1, 2, 3, 4, 5], seed=1, first=first)
    a = [g[0] for g in per_example_grads(method, dp, d1)]
    d2 = batch_draws(method, train, [0, 100, 200, 300, 400], seed=2, first=first)  # other examples and draws
    b = [g[0] for g in per_example_grads(method, dp, d2)]
    for ga, gb in zip(a, b, strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
    # and it is the gradient of example 0's whole loss (through student and discriminator), by plain autograd
    d0 = d1.part(slice(0, 1))
    out_T = method.outputs(method.teacher_ema.model, d0)
    method.net.zero_grad()
    x, s, y = (d0.rows(t) for t in method.net_inputs(d0))
    out = method.assemble(method.net(x, s, y).view_as(d0.x), d0)
    method.losses(out, out_T, d0).sum().backward()
    assert all(p.grad is None for p in method.disc.parameters()), "the discriminator is frozen in the loss"
    for g, p in zip(a, method.net.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


def test_edm_distillation_loss_equals_a_hand_computation(train, one_thread) -> None:
    """ℓ_i = w(σ)·mean(D_ψ − D_θ)² + w(σ)·mean(D_θ − x_0)² + λ·log(1 − φ), with dpdm's preconditioning written out
    (σ_d = √(1/3)), on a 2-example batch with K = 2 draws each, label dropout on example 1."""
    lam = 0.7
    method = build("dpsad", train, lambda_adv=lam, timesteps_per_example=2, **EDM)
    for net in (method.net, method.teacher, method.disc):  # away from the zero-initialised output layers
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x0, y = to_model_range(train.images[:2]), train.labels[:2]
    y_in = torch.stack([y[0], torch.tensor(10)])  # example 1's label dropped to the "no label" class
    sigma = torch.tensor([[0.05, 1.3], [0.4, 7.0]])
    noise = torch.randn(2, 2, *x0.shape[1:], generator=torch.Generator().manual_seed(3))
    d = method.draws_from(x0, y, y_in, sigma, noise)
    got = method.losses(method.outputs(method.net, d), method.outputs(method.teacher, d), d)

    sd2 = 1.0 / 3.0
    expected = torch.zeros(2)
    for i in range(2):
        for k in range(2):
            s = sigma[i, k]
            x = x0[i] + s * noise[i, k]
            c_skip, c_out, c_in = sd2 / (s**2 + sd2), s * sd2**0.5 / (sd2 + s**2) ** 0.5, 1 / (sd2 + s**2) ** 0.5
            c_noise, w = torch.log(s) / 4, (s**2 + sd2) / (s**2 * sd2)
            with torch.no_grad():
                d_s = c_skip * x + c_out * method.net((c_in * x)[None], c_noise[None], y_in[i : i + 1])[0]
                d_t = c_skip * x + c_out * method.teacher((c_in * x)[None], c_noise[None], y_in[i : i + 1])[0]
                logit = method.disc((c_in * x)[None], d_s[None], c_noise[None], y[i : i + 1])[0]
            adv = torch.log(1 - torch.sigmoid(logit))  # the paper's saturating log(1 − D)
            expected[i] += (w * ((d_s - d_t) ** 2).mean() + w * ((d_s - x0[i]) ** 2).mean() + lam * adv) / 2
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - expected).abs().max() < 1e-3 * expected.abs().max()
    # the data term alone is dpdm's loss (bench.diffusion.edm.loss) of the student at the same draws
    plain = build("dpsad", train, lambda_adv=0.0, timesteps_per_example=2, **EDM)
    plain.net.load_state_dict(method.net.state_dict())
    plain.teacher.load_state_dict(method.net.state_dict())  # teacher = student: the distillation term is 0
    data_term = plain.losses(plain.outputs(plain.net, d), plain.outputs(plain.teacher, d), d)
    dpdm = torch.stack([edm_loss(plain.pre, plain.net, x0[i : i + 1], y_in[i : i + 1], sigma[i : i + 1],
                                 noise[i : i + 1]) for i in range(2)])  # fmt: skip
    torch.testing.assert_close(data_term, dpdm.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("denoiser", DENOISERS)
@pytest.mark.parametrize("clip_target", ["params", "output"])
def test_sigma_0_and_no_clipping_is_a_plain_distillation_step(
    train, one_thread, clip_target: str, denoiser: str
) -> None:
    method = build("dpsad", train, clip_target=clip_target, **DENOISERS[denoiser])
    B, n = 8, len(train)
    d = batch_draws(method, train, list(range(B)), seed=3)
    out_T = method.outputs(method.teacher_ema.model, d)
    start = copy.deepcopy(method.net.state_dict())
    opt = torch.optim.SGD(method.net.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(0)
    if clip_target == "params":
        step = method._student_dp(opt, 0.0, B / n, n, gen)
        step.max_grad_norm = math.inf  # C = ∞ with σ = 0 (DPSGD allows it)
    else:
        step = OutputClipStep(method, opt, sigma_eff=0.0, C=math.inf, q=B / n, n=n, generator=gen)
    step.step_outputs(method.net_inputs(d), method.output_grads(out_T, d))
    dp_params = [p.detach().clone() for p in method.net.parameters()]
    method.net.load_state_dict(start)
    method.distillation_step(opt, d, out_T, divisor=B)  # B = q·N: the same normalisation
    moved = 0.0
    for a, p, p0 in zip(dp_params, method.net.parameters(), start.values(), strict=True):
        torch.testing.assert_close(a, p.detach(), rtol=1e-4, atol=1e-6)
        moved = max(moved, (a - p0).abs().max().item())
    assert moved > 1e-4, "the step must move the student"


def test_output_clipping_adds_the_charged_noise_on_an_empty_batch(train, one_thread) -> None:
    """clip_target = "output" on an empty Poisson batch: each parameter's gradient is N(0, σ²C²)/(q·N), as the
    charged poisson_gaussian step (not a zero step)."""
    method = build("dpsad", train, clip_target="output")
    n, q, sigma, C = len(train), 0.01, 2.0, 0.5
    d = batch_draws(method, train, [], seed=3)
    start = [p.detach().clone() for p in method.net.parameters()]
    opt = torch.optim.SGD(method.net.parameters(), lr=1.0)
    step = OutputClipStep(method, opt, sigma_eff=sigma, C=C, q=q, n=n, generator=torch.Generator().manual_seed(0))
    step.step_outputs(method.net_inputs(d), method.output_grads(method.outputs(method.teacher, d), d))
    moved = torch.cat([(p0 - p.detach()).flatten() for p, p0 in zip(method.net.parameters(), start, strict=True)])
    assert step.steps == 1 and len(moved) > 10_000
    expected = sigma * C / (q * n)
    assert abs(moved.std().item() / expected - 1) < 0.05 and abs(moved.mean().item()) < 5 * expected / len(moved) ** 0.5


@pytest.mark.parametrize("denoiser", DENOISERS)
def test_bt_noise_divisor_is_charged_as_sigma_over_T(train, one_thread, monkeypatch, denoiser: str) -> None:
    executed: list[float] = []  # noise multiplier of every executed student step
    real_release = DPSGD._release

    def spy(self, B, clipped_sum):
        executed.append(self.noise_multiplier)
        return real_release(self, B, clipped_sum)

    monkeypatch.setattr(DPSGD, "_release", spy)
    cards = {}
    for divisor in ("B", "BT"):
        executed.clear()
        ledger, budget = fit(build("dpsad", train, eps=3.0, noise_divisor=divisor, **DENOISERS[denoiser]), train, 3.0)
        (stage,) = ledger.stages
        assert executed == [stage.noise_multiplier] * stage.steps, "the ledger charges what was added"
        cards[divisor] = privacy_card(
            ledger, budget, epsilon=epsilon(ledger, budget.delta, budget.accountant), guarantee="partial"
        )
    b, bt = cards["B"], cards["BT"]
    T = build("dpsad", train).config.T
    assert bt["stages"][0]["noise_multiplier"] == pytest.approx(b["stages"][0]["noise_multiplier"] / T)
    assert bt["epsilon"] > b["epsilon"] * 10  # recomputed from σ/T
    assert b["epsilon"] == pytest.approx(3.0, rel=1e-3) and b["epsilon"] <= 3.0
    assert bt["claimed_epsilon"] == pytest.approx(b["claimed_epsilon"]) == pytest.approx(3.0, rel=1e-3)
    assert b["non_private"] == bt["non_private"] == [TEACHER_NOT_DP, DISC_NOT_DP]
    with pytest.raises(BudgetExceeded):
        verify(PrivacyLedger.from_dict(bt), Budget.for_records(3.0, len(train)))


@pytest.mark.parametrize("denoiser", DENOISERS)
def test_ablation_knobs_run_and_output_clipping_is_declared(train, one_thread, denoiser: str) -> None:
    method = build(
        "dpsad",
        train,
        clip_target="output",
        student_conditional=False,
        disc_conditional=False,
        disc_timestep=False,
        timesteps_per_example=2,
        adversarial_loss="non-saturating",
        **DENOISERS[denoiser],
    )
    ledger, _ = fit(method, train, eps=5.0)
    assert OUTPUT_CLIP_NOT_DP in ledger.non_private
    assert not method.conditional
    x = method.sample(6, labels=None, generator=torch.Generator().manual_seed(0))
    assert x.dtype == torch.uint8 and x.shape == (6, *train.images.shape[1:])


@pytest.mark.parametrize(
    ("sets", "names"),
    [
        ({}, ["teacher", "discriminator", "student"]),
        (EDM, ["teacher", "discriminator", "student"]),
        (
            {"disc_training": "teacher-samples", "budget_split": [0.5, 0.0, 0.5], "pool_size": 40},
            ["teacher", "student"],
        ),
        (
            EDM | {"disc_training": "teacher-samples", "budget_split": [0.5, 0.0, 0.5], "pool_size": 40},
            ["teacher", "student"],
        ),
    ],
)
def test_e2e_card_composes_its_stages_within_budget(train, one_thread, monkeypatch, sets, names) -> None:
    steps: dict[int, int] = {}  # executed DP steps per network
    real_release = DPSGD._release

    def spy(self, B, clipped_sum):
        steps[id(self.model)] = steps.get(id(self.model), 0) + 1
        return real_release(self, B, clipped_sum)

    monkeypatch.setattr(DPSGD, "_release", spy)
    method = build("dpsad-e2e", train, eps=3.0, **sets)
    ledger, budget = fit(method, train, eps=3.0)
    assert [s.name for s in ledger.stages] == names
    assert all(s.mechanism == "poisson_gaussian" for s in ledger.stages)
    nets = {"teacher": method.teacher, "discriminator": method.disc, "student": method.net}
    assert {steps[id(nets[s.name])] for s in ledger.stages} == {s.steps for s in ledger.stages}
    assert len(steps) == len(names)
    eps = verify(ledger, budget)
    assert 0.99 * 3.0 <= eps <= 3.0, "the common scale fills the budget"
    card = privacy_card(ledger, budget, epsilon=eps, guarantee=method.guarantee)
    assert card["guarantee"] == "end-to-end" and card["non_private"] == [] and card["claimed_epsilon"] is None
    alone = {s.name: epsilon([s], budget.delta) for s in ledger.stages}
    assert alone["teacher"] == pytest.approx(alone["student"], rel=1e-6)  # equal shares, equal q and steps
    if "discriminator" in alone:
        assert alone["discriminator"] < alone["teacher"]  # half the share


@pytest.mark.parametrize(
    ("name", "sets", "message"),
    [
        ("dpsad", {"lambda_adv": -1.0}, "lambda_adv"),
        ("dpsad", {"T": 1}, "T must be ≥ 2"),
        ("dpsad", {"clip_target": "grads"}, "clip_target"),
        ("dpsad", {"noise_divisor": "T"}, "noise_divisor"),
        ("dpsad-e2e", {"budget_split": (0.5, 0.2, 0.2)}, "must sum to 1"),
        ("dpsad-e2e", {"lambda_adv": -0.5}, "lambda_adv"),
        ("dpsad-e2e", {"disc_training": "teacher-samples"}, "discriminator share must be"),
        ("dpsad", {"denoiser": "vp"}, "denoiser"),
        ("dpsad", {"denoiser": "edm"}, "does not fit denoiser 'edm'"),  # the paper's sampler "ddpm"
        ("dpsad", {"denoiser": "edm", "sampler": "edm-heun", "guidance": 1.0}, "needs label_dropout"),
        ("dpsad-e2e", {"sampler": "edm-heun"}, "does not fit denoiser 'ddpm'"),
        ("dpsad", {"teacher_ema_decay": 1.0}, "teacher_ema_decay"),
        ("dpsad-e2e", {"student_init": "copy"}, "student_init"),
        ("dpsad-e2e", {"teacher_physical_batch_size": 0}, "teacher_physical_batch_size"),
        ("dpsad-e2e", {"student_init": "teacher", "base_channels": 16}, "base_channels vs teacher_base_channels"),
        ("dpsad-e2e", {"student_init": "teacher", "student_conditional": False}, "student_conditional = false"),
    ],
)
def test_bad_config_is_a_value_error(name: str, sets: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        registry.get(name).Config(**sets)


@pytest.mark.parametrize(
    ("method", "setting", "message"),
    [
        ("dpsad", "lambda_adv=-1", "lambda_adv"),
        ("dpsad", "T=1", "T must be ≥ 2"),
        ("dpsad", "clip_target=grads", "clip_target"),
        ("dpsad", "noise_divisor=T", "noise_divisor"),
        ("dpsad-e2e", "budget_split=[0.5,0.3,0.3]", "must sum to 1"),
    ],
)
def test_bad_config_is_one_line_before_training(tmp_path: Path, method: str, setting: str, message: str) -> None:
    results = tmp_path / "res"
    r = bench(
        "run", "--methods", method, "--eps", "10", "--dataset", "synthetic", "--profile", TINY_PROFILE,
        "--device", "cpu", "--results", str(results), "--set", setting,
    )  # fmt: skip
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not results.exists(), "nothing may run or be written"


def test_table_marks_the_partial_dpsad_row(tmp_path: Path) -> None:
    results, out = tmp_path / "res", tmp_path / "rep"
    r = bench(
        "run", "--methods", "dpsad,dpsad-e2e", "--eps", "10", "--dataset", "synthetic", "--profile", TINY_PROFILE,
        "--device", "cpu", "--results", str(results), "--set", "eval.metrics=[\"acc_logreg\"]",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    r = bench("report", "--results", str(results), "--out", str(out), "--no-plots")
    assert r.exit_code == 0, r.output
    table = "\n".join(p.read_text() for p in sorted(out.glob("*.md")))
    assert f"dpsad{PARTIAL_MARK}" in table
    assert f"dpsad-e2e{PARTIAL_MARK}" not in table and "dpsad-e2e" in table
    assert FOOTNOTES[PARTIAL_MARK] in table


class _Capture:
    """A Progress that keeps the checkpointed state after the given numbers of steps, or resumes from one."""

    def __init__(self, at: tuple[int, ...] = (), state: dict | None = None) -> None:
        self.at, self.state, self.done, self.saved = at, state, 0, {}

    def start(self, total: int, description: str = "") -> None:
        pass

    def advance(self, n: int = 1) -> None:
        self.done += n

    def resume(self) -> dict | None:
        return self.state

    def checkpoint(self, state_fn) -> None:
        if self.done in self.at:
            self.saved[self.done] = copy.deepcopy(state_fn())


@pytest.mark.parametrize("denoiser", DENOISERS)
@pytest.mark.parametrize(
    ("name", "at", "sets"),
    [("dpsad", (1, 2), {}), ("dpsad-e2e", (2, 4), {}), ("dpsad-e2e", (2, 3, 4), {"student_init": "teacher"})],
    ids=["dpsad", "dpsad-e2e", "dpsad-e2e-student-init-teacher"],
)
def test_an_interrupted_fit_resumes_to_the_same_model(
    train, one_thread, name: str, at: tuple, sets: dict, denoiser: str
) -> None:
    """dpsad: checkpoints after student steps 1 and 2 of 3 (its teacher is a shared stage, not in its fit); dpsad-e2e:
    in the DP teacher's phase (2 of its 3 steps) and in the student's (step 4); with student_init = "teacher" also at
    the end of the teacher's phase (3), before the student is initialised, and after (4: not initialised again). A
    resumed fit, whatever its generator's seed, continues the checkpoint's (dpsad: the same teacher, whose seed the
    checkpoint keeps)."""
    budget = Budget.for_records(5.0, len(train))
    whole, capture = build(name, train, eps=5.0, **DENOISERS[denoiser], **sets), _Capture(at=at)
    whole.fit(train, budget=budget, generator=torch.Generator().manual_seed(0), progress=capture)
    assert sorted(capture.saved) == list(at)
    for k in at:
        resumed = build(name, train, eps=5.0, **DENOISERS[denoiser], **sets)
        ledger = resumed.fit(
            train,
            budget=budget,
            generator=torch.Generator().manual_seed(123),
            progress=_Capture(state=capture.saved[k]),
        )
        for a, b in zip(whole.state_dict()["ema"].values(), resumed.state_dict()["ema"].values(), strict=True):
            assert torch.equal(a, b), f"resumed after step {k}"
        assert ledger.stages[-1].steps == 3  # the steps before the interruption are charged once, not twice


def test_e2e_teacher_backward_chunks_are_its_own_physical_batch(train, one_thread, monkeypatch) -> None:
    """The DP teacher's K rows per example are what fills a GPU (paper profile: 512 × 32 rows ran out of an H200):
    its step is taken in chunks of teacher_physical_batch_size examples, the other networks' in physical_batch_size
    ones, and the chunked step is still one release per step."""
    chunks: dict[int, list[int]] = {}
    real_chunked = DPSGD._chunked

    def spy(self, batch, B, clip):
        def counted(chunk):
            chunks.setdefault(id(self.model), []).append(len(chunk[0]))
            return clip(chunk)

        return real_chunked(self, batch, B, counted)

    monkeypatch.setattr(DPSGD, "_chunked", spy)
    method = build("dpsad-e2e", train, eps=3.0, teacher_physical_batch_size=3, physical_batch_size=1000)
    ledger, _ = fit(method, train, eps=3.0)
    teacher, student = chunks[id(method.teacher_method.net)], chunks[id(method.net)]
    steps = {s.name: s.steps for s in ledger.stages}
    assert max(teacher) == 3 and len(teacher) >= 2 * steps["teacher"]  # ~64-example batches in chunks of 3
    assert max(student) > 3, "the student keeps physical_batch_size"
    assert chunks[id(method.disc)] and max(chunks[id(method.disc)]) > 3


def test_the_paper_profile_takes_at_most_4096_rows_per_backward() -> None:
    """Measured on an H200 (140 GiB): dpdm's step at 512 examples × K = 32 rows per backward ran out of memory, and
    at 128 × 32 = 4,096 rows peaked at 114 GiB (fp32). Every K > 1 step of the paper profile stays at that size."""
    profile = config.load_profile("paper")
    fields = {"dpdm": ("physical_batch_size", "noise_multiplicity"),
              "dpsad-e2e": ("teacher_physical_batch_size", "teacher_noise_multiplicity")}  # fmt: skip
    for name, (physical, draws) in fields.items():
        for dataset in ("mnist", "fmnist", "cifar10", "celeba64-gender"):
            cfg, _ = config.resolve(registry.get(name).Config, profile=profile, method=name, dataset=dataset,
                                    epsilon=10.0, sets={})  # fmt: skip
            assert getattr(cfg, physical) * getattr(cfg, draws) <= 4096, (name, dataset)


@pytest.mark.parametrize("denoiser", DENOISERS)
def test_e2e_student_starts_as_the_dp_teacher_only_when_asked(train, one_thread, monkeypatch, denoiser: str) -> None:
    """student_init = "teacher": the student (and its EMA) enter their first DP step with the DP teacher's released
    (EMA) weights, and the ledger is unchanged (post-processing of a DP output); "random" keeps its own init."""
    entered: dict[str, list[torch.Tensor]] = {}
    real_phase = StudentFit.student_phase

    def spy(self, *args, **kwargs):
        m = self.method
        entered["teacher"] = [p.detach().clone() for p in m.teacher_ema.model.parameters()]
        entered["student"] = [p.detach().clone() for p in m.net.parameters()]
        entered["ema"] = [p.detach().clone() for p in m.ema.model.parameters()]
        return real_phase(self, *args, **kwargs)

    monkeypatch.setattr(StudentFit, "student_phase", spy)
    ledgers = {}
    for init in ("random", "teacher"):
        method = build("dpsad-e2e", train, eps=3.0, student_init=init, **DENOISERS[denoiser])
        ledgers[init], _ = fit(method, train, eps=3.0)
        same = [torch.equal(a, b) for a, b in zip(entered["teacher"], entered["student"], strict=True)]
        assert all(same) == (init == "teacher")
        assert all(torch.equal(a, b) for a, b in zip(entered["student"], entered["ema"], strict=True))
    assert ledgers["random"].stages == ledgers["teacher"].stages
