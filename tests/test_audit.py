"""bench audit: the one-run bound (Steinke, Nasr, Jagielski 2023), the canary pipeline with both controls, and
the verdicts on a plugin that claims ε = 1 without noise and on a correct one."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.optimize
import scipy.stats
import torch

from bench import audit
from bench.audit import epsilon_lower_bound, p_value
from bench.contract import ImageDataset
from bench.grid import registry
from tests.conftest import TESTS, TINY_PROFILE, bench

COPIES = str(TESTS / "plugins" / "copies.py")


def logit(p: float) -> float:
    return math.log(p / (1 - p))


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_guesses_correct_gives_the_closed_form_bound(r: int) -> None:
    """δ = 0, v = r: P[Binomial(r, q) ≥ r] = q^r < β  ⇔  q < β^(1/r), so ε = logit(β^(1/r)) (r = 100: 3.4930)."""
    assert epsilon_lower_bound(10_000, r, r, 0.0) == pytest.approx(logit(0.05 ** (1 / r)), abs=2e-5)
    if r == 100:
        assert epsilon_lower_bound(10_000, 100, 100, 0.0) == pytest.approx(3.4930, abs=1e-4)


def test_the_bound_is_where_the_p_value_crosses_beta() -> None:
    """A partial score (90 of 100 correct): the bound is the ε at which P[Binomial(100, q(ε)) ≥ 90] = 0.05."""
    lb = epsilon_lower_bound(1000, 100, 90, 0.0)
    q = 1 / (1 + math.exp(-lb))
    assert scipy.stats.binom.sf(89, 100, q) == pytest.approx(0.05, abs=1e-4)
    assert p_value(1000, 100, 90, lb, 0.0) < 0.05 <= p_value(1000, 100, 90, lb + 1e-4, 0.0)
    assert epsilon_lower_bound(1000, 100, 50, 0.0) == 0.0  # chance level proves nothing
    assert epsilon_lower_bound(1000, 100, 90, 1e-5) < lb  # δ > 0 only loosens the bound


def test_the_delta_term_by_hand() -> None:
    """m = 10, r = v = 2, ε = 0 (q = 1/2): P[B ≥ 2] = 1/4; max_i P[2 − i ≤ B < 2]/i = max(1/2, 3/4 / 2) = 1/2;
    p = 1/4 + 1/2 · δ · 2m = 0.25 + 0.1 at δ = 0.01."""
    assert p_value(10, 2, 2, 0.0, 0.01) == pytest.approx(0.35)
    assert p_value(10, 2, 2, 0.0, 0.0) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        p_value(10, 2, 3, 0.0, 0.0)


def deterministic_normal(mu: float, n: int) -> np.ndarray:
    """n scores of N(μ, 1) at the quantiles (i + ½)/n, as jax_privacy's tests draw them."""
    return scipy.stats.norm.ppf(np.linspace(0, 1, n, endpoint=False) + 1 / (2 * n)) + mu


def jax_privacy_family_bound(ins: np.ndarray, outs: np.ndarray, delta: float, beta: float) -> float:
    """jax_privacy's `epsilon_one_run` guess family, with our p-value and ε search: one-sided guesses (every
    score ≥ a threshold is "in"), thresholds at the vertices of the upper hull of the points (false negatives,
    true negatives) over all thresholds, Bonferroni over those vertices."""
    thresholds = np.concatenate([np.union1d(ins, outs), [np.inf]])
    fn = np.searchsorted(np.sort(ins), thresholds, side="left")
    tn = np.searchsorted(np.sort(outs), thresholds, side="left")
    hull: list[tuple[int, int]] = []
    for x, y in zip(fn.tolist(), tn.tolist(), strict=True):
        while len(hull) >= 2 and (hull[-1][0] - hull[-2][0]) * (y - hull[-2][1]) >= (hull[-1][1] - hull[-2][1]) * (
            x - hull[-2][0]
        ):
            hull.pop()  # on or below the chord: dominated
        hull.append((x, y))
    m, best = len(ins) + len(outs), 0.0
    for f, t in sorted(hull, key=lambda p: -(len(ins) - p[0]) / max(1, m - p[0] - p[1])):  # precision, descending
        tp, guesses = len(ins) - f, m - f - t
        if guesses and tp / guesses > 1 / (1 + math.exp(-best)):  # else it cannot beat the best so far
            best = max(best, epsilon_lower_bound(m, guesses, tp, delta, beta / len(hull)))
    return best


def gdp_epsilon(mu: float, delta: float) -> float:
    """The ε at δ of μ-GDP (Dong, Roth, Su 2019, Corollary 2.13): the most any test of N(μ, 1) against N(0, 1)
    can show, so an upper limit for every valid lower bound on those scores."""

    def gap(eps: float) -> float:
        phi = scipy.stats.norm.cdf
        return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2) - delta

    return float(scipy.optimize.brentq(gap, 0, 100))


@pytest.mark.parametrize(("mu", "theirs", "ours"), [(1, 1.13346, 2.393), (2, 2.311945, 4.672), (4, 4.395568, 7.491)])
def test_the_bound_against_jax_privacys_one_run_values(mu: float, theirs: float, ours: float) -> None:
    """jax_privacy's tests/auditing_test.py::test_epsilon_one_run_close (google-deepmind/jax_privacy@8967688):
    10,000 in and 10,000 out canaries, scores N(μ, 1) against N(0, 1), β = 0.05, δ = 1e-6. Under its guess
    family our p-value and ε search give its values to 1e-5. Our own family (two-sided guesses at 6 fixed
    counts) gives more on the same scores (it also uses the low tail, and corrects for 6 guesses, not some
    140 to 390 thresholds), and both stay below the μ-GDP ε these scores can show at most."""
    ins, outs = deterministic_normal(mu, 10_000), deterministic_normal(0, 10_000)
    assert jax_privacy_family_bound(ins, outs, 1e-6, 0.05) == pytest.approx(theirs, abs=1e-5)
    members = np.r_[np.ones(10_000, bool), np.zeros(10_000, bool)]
    tiebreak = np.random.default_rng(0).permutation(20_000).astype(float)
    mine = audit.best_guesses({"s": np.r_[ins, outs]}, members, 1e-6, tiebreak)
    assert mine["family"] == 6 and mine["epsilon_lb"] == pytest.approx(ours, abs=1e-3)
    assert theirs < mine["epsilon_lb"] < gdp_epsilon(mu, 1e-6)


def test_canaries_are_held_out_relabelled_and_half_in() -> None:
    from bench import data

    test = data.load("synthetic", "test")
    c = audit.draw_canaries(test, 200, seed=3, kind="mislabelled")
    assert c.images.shape == (200, 1, 16, 16) and bool((c.labels != c.labels.new_tensor(-1)).all())
    originals = {bytes(img.numpy()): int(y) for img, y in zip(test.images, test.labels, strict=True)}
    assert all(originals[bytes(img.numpy())] != int(y) for img, y in zip(c.images, c.labels, strict=True))
    assert 70 < c.members.sum() < 130  # each in with probability 1/2
    again = audit.draw_canaries(test, 200, seed=3, kind="mislabelled")
    assert np.array_equal(again.members, c.members) and torch.equal(again.images, c.images)
    inverted = audit.draw_canaries(test, 200, seed=3)  # the default: the same draw, each image 255 − x
    assert torch.equal(inverted.images, 255 - c.images) and torch.equal(inverted.labels, c.labels)


def test_a_plugin_without_its_noise_is_a_violation_and_a_correct_one_is_consistent(tmp_path: Path) -> None:
    """leaky-copies claims ε = 1 and releases exact copies: its lower bound exceeds 1 (VIOLATION, exit 1) and
    its positive control shows power; noisy-copies (the same with its noise) is consistent; both negative
    controls' AUC intervals contain 0.5. `bench report` shows the audits in their own table."""
    args = ["audit", "--methods", "leaky-copies,noisy-copies", "--eps", "1", "--dataset", "synthetic", "--canaries",
            "200", "--samples", "2500", "--positive-eps", "10000", "--canary-kind", "mislabelled", "--plugin", COPIES,
            "--profile", TINY_PROFILE, "--results", str(tmp_path), "--device", "cpu"]  # fmt: skip
    r = bench(*args)
    assert r.exit_code == 1, r.output
    results = {a["method"]: a for a in audit.stored_audits(audit_store(tmp_path))}
    leaky, noisy = results["leaky-copies"], results["noisy-copies"]
    assert leaky["verdict"] == "VIOLATION" and leaky["epsilon_lb"] > 1 and leaky["positive_power"]
    assert noisy["verdict"] == "consistent" and noisy["epsilon_lb"] <= noisy["audit"]["epsilon"]
    for result in (leaky, noisy):
        ((_, lo, hi),) = result["negative"]["auc"].values()
        assert lo <= 0.5 <= hi and result["negative_ok"]
    assert "| leaky-copies | synthetic | 1 |" in r.stdout and "VIOLATION" in r.stdout
    # resumable part by part: a finished audit is skipped; with its positive part gone, only that part reruns
    run_dir = tmp_path / "runs" / leaky["key"]
    (run_dir / "audit.json").unlink()
    (run_dir / "scores-positive.json").unlink()
    bench(*args)
    log = (run_dir / "log.txt").read_text()
    assert log.count("audit: fit") == 1 and log.count("positive: fit") == 2
    assert json.loads((run_dir / "audit.json").read_text())["epsilon_lb"] == leaky["epsilon_lb"]
    (tmp_path / "bench.sqlite").unlink()  # the index is rebuilt from the folders, audits included
    report = bench("report", "--results", str(tmp_path), "--out", str(tmp_path / "reports"), "--format", "md,csv",
                   "--rebuild")  # fmt: skip
    assert report.exit_code == 0, report.output
    assert "VIOLATION" in (tmp_path / "reports" / "audit.md").read_text() and "consistent" in report.stdout


def test_the_reference_model_shares_no_randomness_with_the_audited_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DP-MERF releases (Σ φ(x) ⊗ e_y + N(0, σ²I)) / n. Were the negative control (the calibration's reference)
    fitted with the audited run's seed, both releases would share their frequencies and their noise, and
    n·release(audit) − n·release(negative) would be the included canaries' embedding sum, exactly (measured
    before AUDIT_VERSION 3: to 1.3e-4 against a noise norm of ~3,162). With each part's own seeds the
    frequencies differ and what is left of that difference is the two noises' size, √2·σ·√d."""
    from bench import data

    DPMERF = registry.get("dpmerf")  # noqa: N806 - the class
    sum_embedding = sys.modules[DPMERF.__module__].sum_embedding
    releases: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []
    fit = DPMERF.fit

    def recording_fit(self, train, *, budget, generator, progress):  # noqa: ANN001, ANN202
        ledger = fit(self, train, budget=budget, generator=generator, progress=progress)
        releases.append((len(train), self.w.clone(), self.noisy_mean * len(train), self.noise_multiplier(budget)))
        return ledger

    monkeypatch.setattr(DPMERF, "fit", recording_fit)
    r = bench("audit", "--methods", "dpmerf", "--eps", "1", "--dataset", "synthetic", "--canaries", "40",
              "--samples", "50", "--profile", TINY_PROFILE, "--results", str(tmp_path), "--device", "cpu")  # fmt: skip
    assert r.exit_code in (0, 1), r.output
    (result,) = audit.stored_audits(audit_store(tmp_path))
    seeds = {part: (result[part]["fit_seed"], result[part]["sample_seed"]) for part in audit.PARTS}
    assert len({s for pair in seeds.values() for s in pair} | {0}) == 7  # six own seeds, none the run's (0)
    (n_in, w_in, sum_in, sigma), (n_out, w_out, sum_out, _), _ = releases  # audit, negative, positive
    canaries = audit.draw_canaries(data.load("synthetic", "test"), 40, seed=0)
    members = torch.from_numpy(canaries.members)
    included = ImageDataset(canaries.images[members], canaries.labels[members], 10, "canaries")
    assert n_in - n_out == len(included) > 0 and not torch.equal(w_in, w_out)
    left = (sum_in - sum_out - sum_embedding(included, w_in, torch.device("cpu"))).norm()
    assert left > 0.7 * math.sqrt(2 * sum_in.numel()) * sigma, (float(left), sigma)


def test_inverted_canaries_are_stronger_than_mislabelled_ones(tmp_path: Path) -> None:
    """The same correct mechanism (noisy-copies) and positive control: the attack separates members from
    non-members far better with inverted canaries (255 − x, far from every training image) than with the
    mislabelled originals, which an unconditional method cannot tell from ordinary images."""
    aucs = {}
    for kind in ("mislabelled", "inverted"):
        r = bench("audit", "--methods", "noisy-copies", "--eps", "1", "--dataset", "synthetic", "--canaries", "200",
                  "--samples", "2500", "--positive-eps", "10000", "--canary-kind", kind, "--plugin", COPIES,
                  "--profile", TINY_PROFILE, "--results", str(tmp_path / kind), "--device", "cpu")  # fmt: skip
        assert r.exit_code == 0, r.output
        (result,) = audit.stored_audits(audit_store(tmp_path / kind))
        aucs[kind] = result["positive"]["auc"]["black-box"]
    assert aucs["inverted"][1] > aucs["mislabelled"][2]  # the intervals do not overlap
    assert aucs["inverted"][0] > 0.85 and aucs["mislabelled"][0] < 0.7


def audit_store(root: Path):  # noqa: ANN201 - a Store
    from bench.grid.store import Store

    return Store(root)


def test_the_diffusion_methods_white_box_score_is_the_released_models_loss() -> None:
    """ConditionalDenoiser.membership_scores: one score per image, the same for the same generator seed, from
    the EMA (released) network; an image the network denoises worse scores lower."""
    from bench import config as cfgmod
    from bench import data

    cls = registry.get("ddpm")
    cfg, _ = cfgmod.resolve(cls.Config, profile=cfgmod.load_profile(TINY_PROFILE), method="ddpm", dataset="synthetic",
                            epsilon=math.inf, sets={})  # fmt: skip
    train = data.load("synthetic", "train")
    method = cls(cfg, spec=train.spec, device=torch.device("cpu"))
    method._build()
    images, labels = train.images[:6], train.labels[:6]
    a = method.membership_scores(images, labels, generator=torch.Generator().manual_seed(1))
    b = method.membership_scores(images, labels, generator=torch.Generator().manual_seed(1))
    assert a.shape == (6,) and torch.equal(a, b) and bool(torch.isfinite(a).all()) and len(set(a.tolist())) == 6
    with torch.no_grad():
        for p in method.ema.model.parameters():
            p.add_(0.5)  # a different released network: different scores (the EMA model is the one scored)
    assert not torch.equal(a, method.membership_scores(images, labels, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--methods", "ddpm"], "ddpm is not differentially private: there is no ε to audit"),
        (["--methods", "dpmerf", "--canaries", "5"], "--canaries must be at least 10, got 5"),
        (["--methods", "dpmerf", "--eps", "10", "--positive-eps", "5"], "--positive-eps must be finite and above"),
    ],
)
def test_bad_audit_options_are_one_line(tmp_path: Path, options: list[str], message: str) -> None:
    r = bench("audit", "--dataset", "synthetic", "--results", str(tmp_path), *options)
    assert r.exit_code == 2 and f"error: {message}" in r.output


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpdm", "dpgan", "pategan", "dpmerf", "dphp", "dpsad", "dpsad-e2e"])
def test_every_private_builtin_can_be_audited(tmp_path: Path, method: str) -> None:
    """The audit of every private built-in on the tiny profile finishes with a verdict (on a CPU and a few
    steps, "inconclusive" is the honest one: the attack has no power against so little training)."""
    r = bench("audit", "--methods", method, "--eps", "10", "--dataset", "synthetic", "--canaries", "100",
              "--samples", "400", "--profile", TINY_PROFILE, "--results", str(tmp_path), "--device", "cpu")  # fmt: skip
    (result,) = audit.stored_audits(audit_store(tmp_path))
    assert result["verdict"] in ("consistent", "inconclusive", "VIOLATION"), r.output
    assert r.exit_code == (1 if result["verdict"] == "VIOLATION" else 0), r.output
