"""`bench audit`: an empirical lower bound on each method's ε from one training run with canaries.

The one-run audit of Steinke, Nasr and Jagielski, "Privacy auditing with one (1) training run" (NeurIPS 2023,
arXiv:2305.08846), Algorithm 1 with the p-value and ε search of its Appendix D (the paper's code, as reproduced
in ubc-systopia/panoramia-privacy-measurement@6541bbb86c10546ba88380e05a125bb35a95a36a:O1_Steinke_Code/o1_audit.py;
ours is written from the formulas: `p_value`, `epsilon_lower_bound`).

One audit cell (method, dataset, ε, seed):
1. Canaries: m images of the held-out test split (a seeded choice), each with its label replaced by another
   class drawn uniformly (a mislabelled image is an outlier of its new class, which a generator of that class
   can only reproduce by memorising it). By default (`--canary-kind inverted`) each is also inverted (255 − x):
   an outlier for an unconditional method too, and a stronger canary (tests/test_audit.py: a positive control's
   AUC 0.918 against 0.603 for the mislabelled originals); `--canary-kind mislabelled` keeps the originals.
   Each canary is included in the training set independently with probability 1/2 (S_i ∈ {in, out}, seeded).
2. The method trains once, through its normal `fit`, on the training split plus the included canaries, at the
   target ε; its ledger is verified as in `bench run` (a run over budget fails).
3. Scores (higher = more likely a member), from the released model only:
   - black-box, every method: minus the L2 distance from the canary to its nearest generated sample of the
     canary's (new) label (all samples for an unconditional method), `--samples` samples;
   - white-box, where the method offers the optional contract member `membership_scores(images, labels,
     generator)` (bench.contract.Method): for the diffusion methods, minus the released (EMA) network's
     denoising loss of the canary at one fixed draw of noise levels and noise shared by all canaries;
   - calibrated, for the audit run and the positive control: each score minus the same score under the
     negative control's model, which removes how typical a canary is from its score (a reference model, as in
     the offline membership-inference attacks). The guesses may use only the released output and what is
     independent of the membership draw and of the mechanism's randomness (the paper's condition), so the
     reference is trained without any canary AND with its own randomness: each part (audit, negative,
     positive) fits and samples from seeds derived from (run seed, part) by numpy's SeedSequence
     (`part_seeds`), recorded in its scores file and in audit.json. (Before AUDIT_VERSION 3 every part used
     the run's seed: in DP-MERF and DP-HP both releases then carried the same frequencies and the same
     noise, and the calibrated score attacked a noise-free difference: tests/test_audit.py.) The white-box
     score's own draw (noise levels and noise, shared by all canaries and parts) is the attacker's choice,
     seeded apart from every fit.
4. Guesses: for each score of the part and each number of guesses r in R = {m/50, m/20, m/10, m/5, m/2, m} (at least 2),
   the top ⌈r/2⌉ scores are guessed "in", the bottom ⌊r/2⌋ "out"; v = correct guesses. The ε lower bound of
   each (score, r) is the paper's at confidence 1 − β/|family| (β = 0.05, Bonferroni over the whole family of
   guesses, fixed in advance), and the cell's lower bound is their maximum: a valid 95% bound.
5. AUC of each score over the m canaries, with a 95% percentile bootstrap interval (1,000 resamples).

Controls, run beside every audit with the same canaries, draws, scores and guesses:
- negative: the same pipeline with no canary inserted. Its AUC interval must contain 0.5, else the audit is
  biased (the scores separate "in" from "out" without training on them) and its verdict is "inconclusive";
- positive: the same pipeline at ε = `--positive-eps` (default 1,000: the method's own code with its noise all
  but switched off, its non-private counterpart). Its AUC interval must lie above 0.5, else the attack has no
  power against this method and the verdict is "inconclusive", never a pass.

Verdict: "VIOLATION" when the lower bound exceeds the ε recomputed from the audit run's ledger (the code leaks
more than its ledger says; `bench audit` exits 1), else "inconclusive" (a control failed), else "consistent".

Deviations from the paper: the paper audits DP-SGD classifiers with white-box gradient canaries or input-space
canaries scored by loss; image generators are scored here by nearest-sample distance (black-box) and by the
denoising loss (white-box). The paper chooses k+ and k− freely; we fix a family of guess counts in advance and
correct for it (Bonferroni), so the reported bound needs no adaptive choice.

Against an outside implementation: jax_privacy's `CanaryScoreAuditor.epsilon_one_run`
(google-deepmind/jax_privacy@8967688c26d46f3b74bfdfe61ef1f984b887abab:jax_privacy/auditing.py) uses the same
p-value and ε search, with another guess family: one-sided (only "in" guesses, every score above a threshold),
thresholds on the upper hull of the ROC points, Bonferroni over the hull's vertices. Our `epsilon_lower_bound`
under its family reproduces its test values (10,000 + 10,000 canaries, scores N(μ, 1) against N(0, 1) at
deterministic quantiles, β = 0.05, δ = 1e-6: ε = 1.13346 / 2.311945 / 4.395568 for μ = 1 / 2 / 4) to 1e-5.
Our own family gives 2.393 / 4.672 / 7.491 on the same scores: it also guesses "out" (the lowest scores),
which uses the other tail, and it pays Bonferroni for 6 guess counts instead of some 140 to 390 hull vertices.
Both stay below the ε that those scores' μ-GDP trade-off implies at δ = 1e-6 (tests/test_audit.py).

An audit cell is a folder results/runs/audit-<method>-<dataset>-<hash>/ (config.json, audit.json, one checkpoint
and one scores file per part: audit, negative, positive; log.txt), resumable part by part, with a row in the
index's `audits` table: never in the utility tables.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch
from sklearn.metrics import roc_auc_score

from bench import config as cfgmod
from bench import data
from bench.contract import ImageDataset
from bench.errors import BenchError
from bench.grid import registry
from bench.grid.planning import plan
from bench.grid.runner import Runner, RunProgress, balanced_labels, bar_callbacks, fit_generator
from bench.grid.store import read_json, write_json
from bench.privacy import Budget, verify
from bench.report.audit_table import audit_table, stored_audits  # noqa: F401 - the reporting side, re-exported

BETA = 0.05  # 1 − confidence of the lower bound
GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
BOOTSTRAP = 1000
PARTS = ("audit", "negative", "positive")
CANARY_KINDS = ("mislabelled", "inverted")
AUDIT_VERSION = 3  # bump when a change here changes an audit's result (2: calibrated scores; 3: own seeds a part)


# ---------------------------------------------------------------------------------------------------
# The one-run bound (Steinke, Nasr, Jagielski 2023, Theorem 3.1 / Appendix D)
# ---------------------------------------------------------------------------------------------------


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses correct] for an (ε, δ)-DP algorithm, m canaries each in with probability 1/2:
    P[Binomial(r, q) ≥ v] with q = e^ε / (1 + e^ε), plus 2mδ · max_{1≤i≤v} P[v − i ≤ Binomial(r, q) < v] / i."""
    if not 0 <= v <= r <= m or eps < 0 or not 0 <= delta <= 1:
        raise ValueError(f"p_value: need 0 ≤ v ≤ r ≤ m, ε ≥ 0, δ in [0, 1]; got m={m} r={r} v={v} ε={eps} δ={delta}")
    q = 1.0 / (1.0 + math.exp(-eps))
    tail = float(scipy.stats.binom.sf(v - 1, r, q))
    if delta == 0:
        return min(tail, 1.0)
    pmf = scipy.stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v-1], P[B = v-2], ..., P[B = 0]
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1))) if v else 0.0
    return min(tail + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = BETA) -> float:
    """The largest ε (to 1e-6) at which v correct of r guesses has p-value < β: with confidence 1 − β the
    algorithm is not (ε', δ)-DP for any ε' below it. 0 when even ε = 0 explains the guesses."""
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            return math.inf
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(m, r, v, mid, delta) < beta else (lo, mid)
    return lo


def guess_counts(m: int) -> list[int]:
    return sorted({max(2, min(m, round(f * m))) for f in GUESS_FRACTIONS})


def best_guesses(
    scores: dict[str, np.ndarray], members: np.ndarray, delta: float, tiebreak: np.ndarray
) -> dict[str, Any]:
    """The lower bound of a cell: the maximum over the fixed family (score × guess count) at confidence
    1 − β/|family|, with the (score, r, v) that reached it."""
    m = len(members)
    family = [(name, r) for name in scores for r in guess_counts(m)]
    best: dict[str, Any] = {"epsilon_lb": 0.0, "score": None, "guesses": 0, "correct": 0, "family": len(family)}
    for name, r in family:
        order = np.lexsort((tiebreak, scores[name]))  # ascending score; ties in a seeded random order
        k_in = (r + 1) // 2
        guessed_in, guessed_out = order[m - k_in :], order[: r - k_in]
        v = int(members[guessed_in].sum() + (~members[guessed_out]).sum())
        eps = epsilon_lower_bound(m, r, v, delta, BETA / len(family))
        if eps > best["epsilon_lb"] or best["score"] is None:
            best = {"epsilon_lb": eps, "score": name, "guesses": r, "correct": v, "family": len(family)}
    return best


def auc_interval(scores: np.ndarray, members: np.ndarray, seed: int) -> tuple[float, float, float]:
    """AUC of `scores` for membership, and its 95% percentile bootstrap interval over the canaries."""
    auc = float(roc_auc_score(members, scores))
    rng = np.random.default_rng(seed)
    m, values = len(members), []
    for _ in range(BOOTSTRAP):
        idx = rng.integers(0, m, m)
        if members[idx].all() or not members[idx].any():
            continue
        values.append(roc_auc_score(members[idx], scores[idx]))
    lo, hi = np.percentile(values, [2.5, 97.5])
    return auc, float(lo), float(hi)


# ---------------------------------------------------------------------------------------------------
# Audit cells
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AuditSpec:
    method: str
    dataset: str
    epsilon: float
    delta: float
    accountant: str
    seed: int
    profile: str
    config: dict[str, Any]
    canaries: int
    samples: int
    positive_epsilon: float
    canary_kind: str = "inverted"
    method_version: str = ""
    data_version: str = ""

    @property
    def key(self) -> str:
        ident = dataclasses.asdict(self) | {"kind": "audit", "v": AUDIT_VERSION}
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return f"audit-{data.file_stem(self.method)}-{data.file_stem(self.dataset)}-{digest}"


def plan_audits(
    *, methods: list[str], epsilons: list[float], datasets: list[str], seeds: list[int], delta: float | None,
    accountant: str, profile: str, sets: list[str], plugins: tuple[str, ...] = (), data_root: str | None = None,
    canaries: int = 1000, samples: int = 2000, positive_epsilon: float = 1000.0, canary_kind: str = "inverted",
) -> list[AuditSpec]:  # fmt: skip
    """The audit cells of a grid: the configs `bench run` would resolve for the same options."""
    if canary_kind not in CANARY_KINDS:
        raise BenchError(f"--canary-kind must be one of {', '.join(CANARY_KINDS)}, got {canary_kind!r}")
    if canaries < 10:
        raise BenchError(f"--canaries must be at least 10, got {canaries}")
    if samples < 1:
        raise BenchError(f"--samples must be at least 1, got {samples}")
    if not math.isfinite(positive_epsilon) or positive_epsilon <= max(epsilons):
        raise BenchError(f"--positive-eps must be finite and above every audited ε, got {positive_epsilon:g}")
    for name in methods:
        if registry.get(name, plugins).guarantee == "none":
            raise BenchError(f"{name} is not differentially private: there is no ε to audit")
    specs = plan(methods=methods, epsilons=epsilons, datasets=datasets, seeds=seeds, delta=delta,
                 accountant=accountant, profile=profile, sets=sets, plugins=plugins, data_root=data_root)  # fmt: skip
    return [
        AuditSpec(method=s.method, dataset=s.dataset, epsilon=s.epsilon, delta=s.delta, accountant=s.accountant,
                  seed=s.seed, profile=s.profile, config=s.config_json, canaries=canaries, samples=samples,
                  positive_epsilon=positive_epsilon, canary_kind=canary_kind, method_version=s.method_version,
                  data_version=s.data_version)
        for s in specs
    ]  # fmt: skip


def part_seeds(seed: int, part: str) -> tuple[int, int]:
    """(fit seed, sample seed) of one part of an audit cell (audit, negative, positive): drawn from numpy's
    SeedSequence of (run seed, part), so the reference model shares no randomness with the audited run (nor
    the positive control with either), and the same cell draws the same seeds when it resumes."""
    state = np.random.SeedSequence(entropy=seed, spawn_key=(PARTS.index(part),)).generate_state(2, dtype=np.uint32)
    return int(state[0]), int(state[1])


@dataclass
class Canaries:
    images: torch.Tensor  # uint8 [m, C, H, W]
    labels: torch.Tensor  # int64 [m], reassigned
    members: np.ndarray  # bool [m]
    tiebreak: np.ndarray  # a seeded random order for tied scores


def draw_canaries(test: ImageDataset, m: int, seed: int, kind: str = "inverted") -> Canaries:
    """m held-out images with a reassigned label; "inverted" also turns each into its negative (255 − x), an
    image far from every training image that only memorisation reproduces (the same draws otherwise)."""
    if m > len(test):
        raise BenchError(f"--canaries {m}: the test split has only {len(test)} images to draw canaries from")
    g = torch.Generator().manual_seed(seed + 7_919)
    index = torch.randperm(len(test), generator=g)[:m]
    shift = torch.randint(1, test.num_classes, (m,), generator=g) if test.num_classes > 1 else torch.zeros(m)
    labels = (test.labels[index] + shift.long()) % test.num_classes
    members = (torch.rand(m, generator=g, dtype=torch.float64) < 0.5).numpy()
    tiebreak = torch.rand(m, generator=g, dtype=torch.float64).numpy()
    images = test.images[index]
    return Canaries(255 - images if kind == "inverted" else images, labels, members, tiebreak)


def nearest_sample_scores(canaries: Canaries, images: torch.Tensor, labels: torch.Tensor | None) -> np.ndarray:
    """Minus the L2 distance (pixels in [0, 1]) from each canary to its nearest sample of the canary's label
    (any label when `labels` is None); −∞ where no sample has that label."""
    x = canaries.images.flatten(1).double() / 255
    s = images.flatten(1).double() / 255
    dist = torch.cdist(x, s)
    if labels is not None:
        dist = dist.masked_fill(canaries.labels[:, None] != labels[None, :], math.inf)
    return (-dist.min(dim=1).values).numpy()


class Auditor:
    """Runs audit cells with a Runner's store, data, device, locks and checkpoint interval."""

    def __init__(self, runner: Runner) -> None:
        self.r = runner

    def run(self, spec: AuditSpec, ui: Any = None) -> str:
        key = spec.key
        with self.r.cell_lock(key) as mine:
            if not mine:
                return "busy"
            run_dir = self.r.store.run_dir(key)
            if (run_dir / "audit.json").is_file() and not self.r.force:
                return "skipped"
            if self.r.force:
                self.r.store.clear_audit(key)
            run_dir.mkdir(parents=True, exist_ok=True)
            return self.r._guarded(key, run_dir, lambda: self._run(spec, run_dir, ui), record=self._failed)

    def _failed(self, key: str, error: str | None, status: str) -> None:
        self.r.store.record_audit(key, status=status, error=error)

    def _run(self, spec: AuditSpec, run_dir: Path, ui: Any) -> str:
        cls = registry.get(spec.method, self.r.plugins)
        record = {"kind": "audit", **dataclasses.asdict(spec), "key": spec.key, "device": str(self.r.device)}
        write_json(run_dir / "config.json", record | {"code": registry.code_record(cls)})
        self.r.store.record_audit(spec.key, method=spec.method, dataset=spec.dataset, target_epsilon=spec.epsilon,
                                  seed=spec.seed, profile=spec.profile, status="running", error=None)  # fmt: skip
        self.r.log(run_dir, f"start audit {spec.key} on {self.r.device}")
        train, test = self.r.dataset(spec.dataset, "train"), self.r.dataset(spec.dataset, "test")
        canaries = draw_canaries(test, spec.canaries, spec.seed, spec.canary_kind)
        parts = {part: self._part(spec, cls, part, train, canaries, run_dir, ui) for part in PARTS}
        result = analyse(spec, canaries, parts)
        write_json(run_dir / "audit.json", result)
        self.r.store.record_audit(spec.key, status="done", verdict=result["verdict"],
                                  lower_bound=result["epsilon_lb"], info=json.dumps(result))  # fmt: skip
        self.r.log(run_dir, f"audit: ε lower bound {result['epsilon_lb']:.4g}, verdict {result['verdict']}")
        return "done"

    def _part(
        self, spec: AuditSpec, cls: Any, part: str, train: ImageDataset, canaries: Canaries, run_dir: Path, ui: Any
    ) -> dict[str, Any]:
        """One training run of the audit (its canaries in), the negative control (none in) or the positive
        control (in, at the positive ε): its ledger's ε and its canaries' scores, saved, so a resumed audit
        skips the parts it finished."""
        path = run_dir / f"scores-{part}.json"
        if path.is_file():
            return dict(read_json(path))
        inserted = part != "negative"
        members = torch.from_numpy(canaries.members)
        images = torch.cat([train.images, canaries.images[members]]) if inserted else train.images
        labels = torch.cat([train.labels, canaries.labels[members]]) if inserted else train.labels
        trainset = ImageDataset(images, labels, train.num_classes, train.name)
        eps = spec.positive_epsilon if part == "positive" else spec.epsilon
        budget = Budget(epsilon=eps, delta=spec.delta, accountant=spec.accountant)
        config = cfgmod.build_dataclass(cls.Config, spec.config, spec.method)
        method = cls(config, spec=trainset.spec, device=self.r.device)
        progress = RunProgress(run_dir / f"checkpoint-{part}.pt", self.r.checkpoint_every_s,
                               *bar_callbacks(ui, spec))  # fmt: skip
        fit_seed, sample_seed = part_seeds(spec.seed, part)
        t0 = time.perf_counter()
        ledger = method.fit(trainset, budget=budget, generator=fit_generator(fit_seed), progress=progress)
        fit_s = time.perf_counter() - t0
        spent = verify(ledger, budget)  # over budget: the cell fails, as in `bench run`
        n = spec.samples
        sample_labels = balanced_labels(n, train.num_classes) if method.conditional else None
        samples = method.sample(n, labels=sample_labels, generator=torch.Generator().manual_seed(sample_seed))
        scores = {"black-box": nearest_sample_scores(canaries, samples.cpu(), sample_labels)}
        white = getattr(method, "membership_scores", None)
        if callable(white):
            with torch.no_grad():
                g = torch.Generator().manual_seed(spec.seed + 5)
                scores["white-box"] = white(canaries.images, canaries.labels, generator=g).cpu().double().numpy()
        out = {"part": part, "target_epsilon": eps, "epsilon": spent, "fit_s": round(fit_s, 3),
               "fit_seed": fit_seed, "sample_seed": sample_seed,
               "inserted": int(canaries.members.sum()) if inserted else 0,
               "scores": {k: v.tolist() for k, v in scores.items()}}  # fmt: skip
        write_json(path, out)
        (run_dir / f"checkpoint-{part}.pt").unlink(missing_ok=True)
        self.r.log(run_dir, f"{part}: fit {fit_s:.1f} s, ε = {spent:.4g} (target {eps:g})")
        return out


def analyse(spec: AuditSpec, canaries: Canaries, parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The bound, the AUCs with their intervals, the controls and the verdict of one audit cell."""
    members = canaries.members
    summary: dict[str, Any] = {"key": spec.key, "method": spec.method, "dataset": spec.dataset,
                               "target_epsilon": spec.epsilon, "delta": spec.delta, "seed": spec.seed,
                               "canaries": spec.canaries, "inserted": int(members.sum()), "samples": spec.samples,
                               "positive_epsilon": spec.positive_epsilon, "confidence": 1 - BETA}  # fmt: skip
    raw = {part: _finite(record["scores"]) for part, record in parts.items()}
    for part in ("audit", "positive"):  # calibrated: minus the reference model's score of the same canary
        raw[part] |= {f"{k} calibrated": v - raw["negative"][k] for k, v in list(raw[part].items())}
    for part, record in parts.items():
        scores = raw[part]
        aucs = {k: auc_interval(v, members, spec.seed + i) for i, (k, v) in enumerate(sorted(scores.items()))}
        summary[part] = {"epsilon": record["epsilon"], "target_epsilon": record["target_epsilon"],
                         "fit_s": record["fit_s"], "fit_seed": record["fit_seed"],
                         "sample_seed": record["sample_seed"], "auc": {k: list(v) for k, v in aucs.items()},
                         **best_guesses(scores, members, spec.delta, canaries.tiebreak)}  # fmt: skip
    audit, negative, positive = (summary[p] for p in PARTS)
    summary["epsilon_lb"] = audit["epsilon_lb"]
    biased = [k for k, (_, lo, hi) in negative["auc"].items() if not lo <= 0.5 <= hi]  # raw scores only
    power = [k for k, (_, lo, _) in positive["auc"].items() if lo > 0.5]
    summary["negative_ok"], summary["positive_power"] = not biased, bool(power)
    if biased:
        verdict, why = "inconclusive", f"negative control biased ({', '.join(biased)} AUC interval excludes 0.5)"
    elif audit["epsilon_lb"] > audit["epsilon"]:
        verdict, why = "VIOLATION", f"lower bound {audit['epsilon_lb']:.3g} > ε {audit['epsilon']:.3g} of the ledger"
    elif not power:
        verdict, why = "inconclusive", "positive control has no power (no AUC interval above 0.5)"
    else:
        verdict, why = "consistent", f"lower bound {audit['epsilon_lb']:.3g} ≤ ε {audit['epsilon']:.3g}"
    summary["verdict"], summary["reason"] = verdict, why
    return summary


def _finite(scores: dict[str, list[float]]) -> dict[str, np.ndarray]:
    """Scores as arrays, −∞ (no sample of the canary's label) replaced by one below the lowest finite score."""
    out = {}
    for k, v in scores.items():
        a = np.asarray(v, dtype=np.float64)
        out[k] = np.nan_to_num(a, neginf=np.min(a[np.isfinite(a)], initial=0.0) - 1.0)
    return out


def run_audits(r: Runner, specs: list[AuditSpec], *, echo: Callable[[str], None] = lambda line: None) -> dict[str, str]:
    """Run the audit cells one after another (the runner's locks: a second process waits for a cell in
    progress); returns key -> outcome."""
    from bench.ui import GridUI

    auditor = Auditor(r)
    outcomes: dict[str, str] = {}
    with GridUI(len(specs), title="audits") as ui:
        for spec in specs:
            outcomes[spec.key] = auditor.run(spec, ui)
            ui.grid_advance(spec, outcomes[spec.key], r.errors.get(spec.key))
    for key, error in r.errors.items():
        echo(f"error: audit {key} failed: {error}; its log: {r.store.run_dir(key) / 'log.txt'}")
    return outcomes
