"""DP-SAD: stochastic adversarial distillation of diffusion models (Liu, Wang, Ge, ECCV 2024, arXiv 2408.14738).

No public code of the paper exists (shared/METHODS.md), so there is no repository@commit to cite: this follows
the paper's text, and every choice it leaves open is a config field with a comment. The paper's mechanism (see
shared/METHODS.md, "DP-SAD"); its end-to-end DP variant is methods/dpsad_e2e.py,
and what both share (networks, the distillation loss, the student step, sampling) is methods/dpsad_common.py.

A class-conditional DDPM teacher ε_ψ (linear β, T = 500) is trained on
the private data WITHOUT DP. A student ε_θ of the same kind is distilled from it: each Poisson-sampled
example draws one timestep r and noise ε, x_r = sqrt(ᾱ_r)·x_0 + sqrt(1 − ᾱ_r)·ε, and its loss is

    ℓ_i(θ) = ‖ε_ψ(x_r, r, y) − ε_θ(x_r, r, y)‖² + ‖ε − ε_θ(x_r, r, y)‖² + λ · L_adv(ε_φ(x_r, ε_θ(x_r, r, y), y))

(squared norms as means over pixels; L_adv = log(1 − D), the paper's form, or −log D). The
class-conditional discriminator ε_φ sees (x_r, teacher or student output) and is trained, without DP,
to tell teacher (label 1) from student (label 0). The student's updates are clipped and noised:

- clip_target = "params": DP-SGD (bench.dpsgd.DPSGD) on ℓ_i: per-example parameter gradients ḡ_i clipped
  to C, g̃ = (Σ ḡ_i + z) / (q·N).
- clip_target = "output" (what secondary reports say the paper does): the gradient of ℓ_i with respect
  to the student's OUTPUT, o_i = ∂ℓ_i/∂ε_θ(x_r,i) [K, C, H, W], is clipped to C, each example's clipped
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

Speed: the teacher's output and the output gradient o_i (which runs the discriminator) are computed
batched, outside the per-example gradient. The per-example gradient of ℓ_i equals that of the surrogate
⟨ε_θ(x_r, r, y), o_i⟩ (chain rule, o_i held fixed), a loss with one student call and nothing else, which
bench.dpsgd's fast "folded" mode handles. This needs a discriminator that treats rows independently
(GroupNorm, never BatchNorm), which tests/test_dpsad.py checks.

Choices the paper leaves open (UNet sizes, batch size, learning rates, C, iterations) are config fields
with a comment each; δ follows the harness rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from bench.methods.dpsad_common import (
    DISC_NOT_DP,
    OUTPUT_CLIP_NOT_DP,
    TEACHER_NOT_DP,
    CommonConfig,
    DPSADBase,
    OutputClipStep,
    StudentFit,
)
from torch import Tensor

from bench.config import choice
from bench.contract import ImageDataset, Progress
from bench.diffusion import denoising_loss, draw_noise_multiplicity
from bench.dpsgd import DPSGD
from bench.nets import seeded_init
from bench.privacy import Budget, PrivacyLedger, Stage, calibrate_sigma, epsilon
from bench.training import ShuffledEpochs, ledger_of, plain_step, plain_steps, poisson_rate, steps_for


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
    version: ClassVar[int] = 1  # bump when a change of this file changes its results (a new run key)
    Config: ClassVar[type] = Config
    guarantee: ClassVar[str] = "partial"

    def fit(
        self, train: ImageDataset, *, budget: Budget, generator: torch.Generator, progress: Progress
    ) -> PrivacyLedger:
        cfg, n = self.config, len(train)
        with seeded_init(generator):  # initial weights from the run's seed
            self._build()
        q = poisson_rate("dpsad: batch_size", cfg.batch_size, n)
        steps = steps_for(cfg.epochs, q)
        # σ as the paper's analysis sets it: the student's subsampled Gaussian alone
        sigma = calibrate_sigma(
            budget.epsilon, sample_rate=q, steps=steps, delta=budget.delta, accountant=budget.accountant
        )
        sigma_eff = sigma / cfg.T if cfg.noise_divisor == "BT" else sigma  # what the code adds (docstring)
        fit = StudentFit(self, train, generator, progress)
        if cfg.clip_target == "params":
            student: DPSGD | OutputClipStep = self._student_dp(fit.opt_s, sigma_eff, q, n, fit.noise_gen)
        else:
            student = OutputClipStep(
                self, fit.opt_s, sigma_eff=sigma_eff, C=cfg.max_grad_norm, q=q, n=n, generator=fit.noise_gen
            )
        fit.counters["student"] = student
        teacher_epochs = ShuffledEpochs(n, cfg.teacher_batch_size, cfg.teacher_epochs)
        teacher_steps = teacher_epochs.steps
        fit.values.update(teacher_step=0, perm=teacher_epochs.first_permutation())
        fit.resume()
        description = f"dpsad teacher (non-private) + student σ_eff={sigma_eff:.4g}"
        fit.start(teacher_steps + steps, description, fit.values["teacher_step"] + student.steps)

        shape = (self.spec.channels, self.spec.height, self.spec.width)

        def teacher_step(idx: Tensor) -> None:  # the teacher, without DP
            t, noise = draw_noise_multiplicity(len(idx), 1, shape, cfg.T, fit.noise_gen, self.device)
            loss = denoising_loss(self.teacher, fit.x[idx], fit.y[idx], t, noise, self.alpha_bar)
            plain_step(self.teacher, fit.opt_t, loss, self.teacher_ema)

        plain_steps(fit, teacher_epochs, self.device, teacher_step, step="teacher_step")

        def disc_update(x_r: Tensor, r: Tensor, y: Tensor, e_T: Tensor, e_S: Tensor) -> None:
            for _ in range(cfg.disc_steps):  # on the student's own batch, without DP
                self.disc_plain_step(fit.opt_d, x_r, r, y, e_T, e_S)

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
