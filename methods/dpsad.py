"""DP-SAD: stochastic adversarial distillation of diffusion models (Liu, Wang, Ge, ECCV 2024, arXiv 2408.14738).

No public code of the paper exists (so there is no repository@commit to cite): this follows the paper's text, and
every choice it leaves open is a config field with a comment. Its end-to-end DP variant is methods/dpsad_e2e.py,
the teacher methods/dpsad_teacher.py, and what both variants share (networks, the distillation loss, the student
step, sampling) methods/dpsad_common.py.

A class-conditional teacher is trained on the private data WITHOUT DP (trained once per seed and shared by every
cell, bench.grid.shared). A student of the same kind is distilled from it: each Poisson-sampled example draws one noise
level and noise, and its loss (methods/dpsad_common.py, for both denoisers) is

    ℓ_i(θ) = w·‖D_ψ(x) − D_θ(x)‖² + w·‖D_θ(x) − target‖² + λ · L_adv(φ(x, D_θ(x), y))

(squared norms as means over pixels; L_adv = log(1 − D), the paper's form, or −log D). With `denoiser = "ddpm"`
(the paper's) D is the ε-prediction at a timestep r, target ε, w = 1; with `denoiser = "edm"` D is dpdm's
preconditioned σ-space denoiser at one σ from the EDM training distribution, target x_0, w the EDM weight: the
data term is dpdm's loss, and dpsad and dpdm then differ only in how the student is trained. The "edm" denoiser is
a deviation from the paper (recorded in every run's config by the field): the paper profile keeps "ddpm", the CPU
profiles (smoke, cpu) use "edm", on which the DDPM path's failure to learn within a CPU budget does not occur. The
class-conditional discriminator φ sees (x, teacher or student output, the noise level, y) and is trained, without
DP, to tell teacher (label 1) from student (label 0), after each student step on that step's outputs. The
student's updates are clipped and noised:

- clip_target = "params": DP-SGD (bench.privacy.dpsgd.DPSGD) on ℓ_i: per-example parameter gradients ḡ_i clipped
  to C, g̃ = (Σ ḡ_i + z) / (q·N).
- clip_target = "output" (what secondary reports say the paper does): the gradient of ℓ_i with respect
  to the student network's OUTPUT, o_i = ∂ℓ_i/∂F_θ(x_i) [K, C, H, W], is clipped to C, each example's clipped
  o_i gets its own N(0, σ_eff²C²) noise, and the noisy output gradients are backpropagated through the
  student: g̃ = Σ_i J_i^T (ō_i + z_i) / (q·N). The paper calls the backward pass post-processing; it is
  not, since J_i depends on the private x_r, so the parameter update of one example is unbounded. The
  ledger charges the Gaussian mechanism on the output gradients and declares this under `non_private`.
- noise_divisor = "B": z ~ N(0, σ²C²) is added to the clipped sum and the whole is divided by q·N
  (DP-SGD). noise_divisor = "BT" (secondary reports): the noise alone is divided by B·T while the sum
  is divided by B, i.e. g̃ = (Σ ḡ_i + z/T) / (q·N). The clipped sum has L2 sensitivity C under
  add/remove-one, and z/T ~ N(0, (σ/T)²C²), so the Gaussian mechanism actually executed has noise
  multiplier σ_eff = σ/T (the final division by q·N is post-processing). **The ledger's student stage
  charges σ_eff = σ/T**, and the code adds exactly σ_eff·C (DPSGD is built with noise_multiplier σ_eff);
  the ε the harness recomputes is therefore far above the target and such a run is refused as over
  budget, which is the point. σ itself is calibrated the way the paper's analysis does: Poisson
  subsampled Gaussian with multiplier σ over the student's steps, teacher and discriminator ignored;
  that analysis' ε (of σ, not σ_eff) is the card's `claimed_epsilon`.

Its ledger lists the teacher and the discriminator under `non_private`: every student loss term depends
on networks trained on all private records, so one record changes every example's gradient and the
clipping bound no longer bounds the sensitivity. Guarantee "partial".

Speed: the teacher's output runs batched, outside the per-example gradient. The student's per-example gradient is
J_iᵀ o_i with o_i = ∂ℓ_i/∂F_i computed batched through the discriminator from the student's outputs, and
bench.privacy.dpsgd's `step_outputs` takes the outputs and the per-example gradients from ONE forward and ONE backward
of the student ("folded" mode). This needs a student and a discriminator that treat rows independently (GroupNorm,
never BatchNorm), which bench.privacy.dpsgd checks at every step and tests/test_dpsad.py tests.

Choices the paper leaves open (network sizes, batch size, learning rates, C, iterations) are config fields
with a comment each; δ follows the harness rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from bench.methods.dpsad_common import (
    DISC_NOT_DP,
    OUTPUT_CLIP_NOT_DP,
    TEACHER_NOT_DP,
    CommonConfig,
    DPSADBase,
    Draw,
    OutputClipStep,
    StudentFit,
)
from bench.methods.dpsad_teacher import TEACHER_FIELDS, DPSADTeacher
from torch import Tensor

from bench.config import build_dataclass, choice, to_jsonable
from bench.contract import ImageDataset, Progress
from bench.nets import seeded_init
from bench.privacy import Budget, PrivacyLedger, Stage, epsilon
from bench.privacy.dpsgd import DPSGD
from bench.privacy.setup import plan_dpsgd, poisson_rate, steps_for
from bench.training import ledger_of


@dataclass(frozen=True, kw_only=True)
class Config(CommonConfig):
    clip_target: Literal["params", "output"] = "params"  # what is clipped: see the module docstring
    noise_divisor: Literal["B", "BT"] = "B"  # "BT" adds noise σC/T: charged as σ/T (module docstring)

    def __post_init__(self) -> None:
        super().__post_init__()
        choice("clip_target", self.clip_target, ("params", "output"))
        choice("noise_divisor", self.noise_divisor, ("B", "BT"))


class DPSAD(DPSADBase):
    """The paper's DP-SAD: non-private teacher and discriminator, DP student (guarantee "partial")."""

    name: ClassVar[str] = "dpsad"
    version: ClassVar[int] = 2  # bump when a change of this file changes its results (a new run key)
    Config: ClassVar[type] = Config
    guarantee: ClassVar[str] = "partial"

    @classmethod
    def reference_rows(cls, config: dict[str, Any], sweep: dict[str, Any]) -> dict[str, tuple[dict, dict]]:
        """The harness's hook (bench.grid.planning.with_reference_rows): the teacher's own row beside the cells, with
        the swept values of the fields that determine the teacher."""
        teacher = to_jsonable(build_dataclass(Config, config, cls.name).teacher_config())
        return {"dpsad-teacher": (teacher, {f: v for f, v in sweep.items() if f in TEACHER_FIELDS})}

    @classmethod
    def work(cls, config: Any, num_records: int, budget: Budget) -> dict[str, int]:
        """{stage: units of work} of a fit (bench.contract, optional members: `work`)."""
        cfg = config
        student = steps_for(cfg.epochs, poisson_rate("dpsad: batch_size", cfg.batch_size, num_records))
        return {**DPSADTeacher.work(config.teacher_config(), num_records, budget), "student dp steps": student}

    def fit(
        self, train: ImageDataset, *, budget: Budget, generator: torch.Generator, progress: Progress
    ) -> PrivacyLedger:
        cfg, n = self.config, len(train)
        with seeded_init(generator):  # initial weights from the run's seed
            self._build()
        # σ as the paper's analysis sets it: the student's subsampled Gaussian alone
        q, steps, sigma = plan_dpsgd("dpsad: batch_size", budget=budget, batch_size=cfg.batch_size, epochs=cfg.epochs,
                                     num_records=n).astuple()  # fmt: skip
        sigma_eff = sigma / cfg.T if cfg.noise_divisor == "BT" else sigma  # what the code adds (docstring)
        fit = StudentFit(self, train, generator, progress, teacher=False)
        if cfg.clip_target == "params":
            student: DPSGD | OutputClipStep = self._student_dp(fit.opt_s, sigma_eff, q, n, fit.noise_gen)
        else:
            student = OutputClipStep(
                self, fit.opt_s, sigma_eff=sigma_eff, C=cfg.max_grad_norm, q=q, n=n, generator=fit.noise_gen
            )
        fit.counters["student"] = student
        fit.values["teacher_seed"] = generator.initial_seed()  # the run's seed (a resumed fit keeps its own)
        fit.resume()
        self.teacher_method.fit_shared(train, fit.values["teacher_seed"], progress)  # trained once, or reused
        fit.start(steps, f"dpsad student σ_eff={sigma_eff:.4g} ({cfg.denoiser})", student.steps)

        def disc_update(d: Draw, out_T: Tensor, out_S: Tensor) -> None:
            for _ in range(cfg.disc_steps):  # on the student's own batch, without DP
                self.disc_plain_step(fit.opt_d, d, out_T, out_S)

        fit.student_phase(student, steps, q, disc_update)

        ledger = ledger_of(student.stage("student"))
        ledger.mark_non_private(TEACHER_NOT_DP)
        if cfg.lambda_adv > 0:
            ledger.mark_non_private(DISC_NOT_DP)
        if cfg.clip_target == "output":
            ledger.mark_non_private(OUTPUT_CLIP_NOT_DP)
        claimed = Stage(
            name="student", mechanism="poisson_gaussian", noise_multiplier=sigma, sampling_rate=q, steps=steps
        )
        ledger.claimed_epsilon = epsilon([claimed], budget.delta, budget.accountant)
        return ledger
