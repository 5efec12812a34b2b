"""DP-SAD specifics: the per-example student gradient, the noisy student step, and what each card charges."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from bench.methods.dpsad_common import DISC_NOT_DP, OUTPUT_CLIP_NOT_DP, TEACHER_NOT_DP, OutputClipStep

from bench import config, registry
from bench.contract import NullProgress
from bench.diffusion import q_sample, to_model_range
from bench.dpsgd import DPSGD
from bench.frame import FOOTNOTES, PARTIAL_MARK
from bench.privacy import Budget, BudgetExceeded, PrivacyLedger, epsilon, privacy_card, verify
from tests.conftest import TINY_PROFILE, bench

CPU = torch.device("cpu")


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


def student_inputs(method, train, index: list[int], seed: int):
    """(x_r, r, y, ε, teacher output, student output) for the examples `index`, draws from `seed`."""
    x0 = to_model_range(train.images[index])
    y = train.labels[index]
    r, eps, x_r = method.draw(x0, torch.Generator().manual_seed(seed))
    e_T = method.outputs(method.teacher_ema.model, x_r, r, y)
    e_S = method.outputs(method.net, x_r, r, y)
    return x_r, r, y, eps, e_T, e_S


@pytest.mark.parametrize("K", [1, 2])
def test_per_example_student_gradient_ignores_the_rest_of_the_batch(train, one_thread, K: int) -> None:
    method = build("dpsad", train, timesteps_per_example=K)
    opt = torch.optim.SGD(method.net.parameters(), lr=0.1)
    dp = method._student_dp(opt, 1.0, 0.01, len(train), torch.Generator().manual_seed(0))
    assert dp.mode == "folded", "teacher and discriminator stay out of the per-example gradient"
    g0 = torch.Generator().manual_seed(99)  # example 0's draws, the same in every batch
    r0 = torch.randint(0, method.config.T, (K,), generator=g0)
    eps0 = torch.randn(K, *train.images.shape[1:], generator=g0)

    def batch(index: list[int], seed: int) -> tuple[torch.Tensor, ...]:
        x0 = to_model_range(train.images[index])
        r, eps, _ = method.draw(x0, torch.Generator().manual_seed(seed))
        r[0], eps[0] = r0, eps0
        x_r = q_sample(x0.unsqueeze(1).expand(len(index), K, *x0.shape[1:]), r, eps, method.alpha_bar)
        return x_r, r, train.labels[index], eps

    def per_example_grads(x_r, r, y, eps) -> list[torch.Tensor]:
        e_T = method.outputs(method.teacher_ema.model, x_r, r, y)
        e_S = method.outputs(method.net, x_r, r, y)
        grads, _ = dp._per_example_grads(x_r, r, y, method.output_grads(e_S, e_T, eps, x_r, r, y))
        return grads

    first = batch([0, 1, 2, 3, 4, 5], seed=1)
    a = [g[0] for g in per_example_grads(*first)]
    b = [g[0] for g in per_example_grads(*batch([0, 100, 200, 300, 400], seed=2))]  # other examples and draws
    for ga, gb in zip(a, b, strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
    # and it is the gradient of example 0's whole loss (through student and discriminator), by plain autograd
    x_r, r, y, eps = (t[:1] for t in first)
    e_T = method.outputs(method.teacher_ema.model, x_r, r, y)
    method.net.zero_grad()
    e = method.net(x_r.flatten(0, 1), r.flatten(), y.repeat_interleave(K)).view_as(x_r)
    method.losses(e, e_T, eps, x_r, r, y).sum().backward()
    assert all(p.grad is None for p in method.disc.parameters()), "the discriminator is frozen in the loss"
    for g, p in zip(a, method.net.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("clip_target", ["params", "output"])
def test_sigma_0_and_no_clipping_is_a_plain_distillation_step(train, one_thread, clip_target: str) -> None:
    method = build("dpsad", train, clip_target=clip_target)
    B, n = 8, len(train)
    x_r, r, y, eps, e_T, e_S = student_inputs(method, train, list(range(B)), seed=3)
    start = copy.deepcopy(method.net.state_dict())
    opt = torch.optim.SGD(method.net.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(0)
    if clip_target == "params":
        step = method._student_dp(opt, 0.0, B / n, n, gen)
        step.max_grad_norm = math.inf  # C = ∞ with σ = 0 (DPSGD allows it)
    else:
        step = OutputClipStep(method, opt, sigma_eff=0.0, C=math.inf, q=B / n, n=n, generator=gen)
    step.step(x_r, r, y, method.output_grads(e_S, e_T, eps, x_r, r, y))
    dp_params = [p.detach().clone() for p in method.net.parameters()]
    method.net.load_state_dict(start)
    method.distillation_step(opt, x_r, r, y, eps, divisor=B)  # B = q·N: the same normalisation
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
    x_r, r, y, eps, e_T, e_S = student_inputs(method, train, [], seed=3)
    start = [p.detach().clone() for p in method.net.parameters()]
    opt = torch.optim.SGD(method.net.parameters(), lr=1.0)
    step = OutputClipStep(method, opt, sigma_eff=sigma, C=C, q=q, n=n, generator=torch.Generator().manual_seed(0))
    step.step(x_r, r, y, method.output_grads(e_S, e_T, eps, x_r, r, y))
    moved = torch.cat([(p0 - p.detach()).flatten() for p, p0 in zip(method.net.parameters(), start, strict=True)])
    assert step.steps == 1 and len(moved) > 10_000
    expected = sigma * C / (q * n)
    assert abs(moved.std().item() / expected - 1) < 0.05 and abs(moved.mean().item()) < 5 * expected / len(moved) ** 0.5


def test_bt_noise_divisor_is_charged_as_sigma_over_T(train, one_thread, monkeypatch: pytest.MonkeyPatch) -> None:
    executed: list[float] = []  # noise multiplier of every executed student step
    real_step = DPSGD.step

    def spy(self, *batch):
        executed.append(self.noise_multiplier)
        return real_step(self, *batch)

    monkeypatch.setattr(DPSGD, "step", spy)
    cards = {}
    for divisor in ("B", "BT"):
        executed.clear()
        ledger, budget = fit(build("dpsad", train, eps=3.0, noise_divisor=divisor), train, eps=3.0)
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


def test_ablation_knobs_run_and_output_clipping_is_declared(train, one_thread) -> None:
    method = build(
        "dpsad",
        train,
        clip_target="output",
        student_conditional=False,
        disc_conditional=False,
        disc_timestep=False,
        timesteps_per_example=2,
        adversarial_loss="non-saturating",
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
        (
            {"disc_training": "teacher-samples", "budget_split": [0.5, 0.0, 0.5], "pool_size": 40},
            ["teacher", "student"],
        ),
    ],
)
def test_e2e_card_composes_its_stages_within_budget(train, one_thread, monkeypatch, sets, names) -> None:
    steps: dict[int, int] = {}  # executed DP steps per network
    real_step = DPSGD.step

    def spy(self, *batch):
        steps[id(self.model)] = steps.get(id(self.model), 0) + 1
        return real_step(self, *batch)

    monkeypatch.setattr(DPSGD, "step", spy)
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


@pytest.mark.parametrize(("name", "at"), [("dpsad", (2, 4)), ("dpsad-e2e", (4,))])
def test_an_interrupted_fit_resumes_to_the_same_model(train, one_thread, name: str, at: tuple[int, ...]) -> None:
    """Checkpoints in the teacher phase (2 of its 3 steps) and in the student phase (step 4) resume exactly."""
    budget = Budget.for_records(5.0, len(train))
    whole, capture = build(name, train, eps=5.0), _Capture(at=at)
    whole.fit(train, budget=budget, generator=torch.Generator().manual_seed(0), progress=capture)
    assert sorted(capture.saved) == list(at)
    for k in at:
        resumed = build(name, train, eps=5.0)
        ledger = resumed.fit(
            train,
            budget=budget,
            generator=torch.Generator().manual_seed(123),
            progress=_Capture(state=capture.saved[k]),
        )
        for a, b in zip(whole.state_dict()["ema"].values(), resumed.state_dict()["ema"].values(), strict=True):
            assert torch.equal(a, b), f"resumed after step {k}"
        assert ledger.stages[-1].steps == 3  # the steps before the interruption are charged once, not twice
