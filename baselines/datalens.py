"""DataLens (Wang, Wu, Long, Rimanic, Zhang, Li, CCS 2021): teacher discriminators, top-k stochastic-sign gradient
compression, noisy vote aggregation, with sound data-independent accounting.

    t_i ~ U{0..T−1} for every record i, drawn ONCE from the run's seed: T disjoint partitions P_j
    repeat `iterations` times:
        teacher_steps ×  (warmup_teacher_steps in the first iteration) every teacher j: one step of the GAN
                         discriminator loss on B records drawn from P_j only vs B generated samples
        generator step:  B_g generated samples x = G(z, y) (z ~ N(0, I), y ~ U{classes}); for each sample and teacher
                           g_j = −∂ mean_B softplus(−T_j(x, y)) / ∂x     (teacher j's gradient on the image)
                           c_j = top-k stochastic sign of g_j: the k coordinates of largest |g_j| get ±1, +1 with
                                 probability clip(1/2 + g/(2b), 0, 1), b = min(max|g_j|, max_grad); the others 0
                           v   = Σ_j c_j + N(0, σ² I)                         (ONE noisy release per sample)
                           d   = +1 where v > β·T, −1 where v < −β·T, else 0  (the voting threshold β)
                         G takes an Adam step on Σ ‖G(z, y) − stopgrad(x + α·d)‖²

Reproduces AI-secure/DataLens@72d0f2fe89aeee2e5a043c17b3de09e0023f94a6: model.py (`DCGAN.train_together`, the
`signsgd` branch of `aggregate_results`, `teacher['img_grads']`, `g_loss = Σ (updated_img − G)²`), rdp_utils.py
(`signsgd_aggregate`, `stachastic_convert2topk[_gpu]`), pate_core.py (`rdp_gaussian`, `compute_eps_from_delta`),
with the README's MNIST/Fashion-MNIST commands (`--signsgd --stochastic --topk 200 --sigma 5000 --thresh 0.9
--max_grad 1e-5 --d_step 2 --pretrain_teacher 10 --z_dim 50 --epoch 300`, 80 × 50 = 4,000 teachers at ε = 1;
`--topk 350 --sigma 1000 --thresh 0.27 --z_dim 64` on Fashion-MNIST at ε = 10). DPImageBench's port,
2019ChenGong/DPImageBench@327fc0d341acef9578b667ca865abeaea8f5cb82:models/DataLens/{model,rdp_utils,pate_core}.py,
is the same TensorFlow code (rdp_utils.py differs only in its imports); its configs
(@6fa80eb8d6221c903e67e7b91a76244fe59ce5b3:configs/DataLens/eps{1.0,10.0}/mnist.yaml) use the README's MNIST values
but topk 200 at ε = 10. It was removed from that repository (6fc5e666cae2d52fc190ea99a7e588cd8bb0b6c3, "rm: rm
methods from models"): 565f8d7e2e0d2faaec43108971db3269519579af keeps only the wrapper models/datalens.py, and its
README publishes no DataLens result.

What the reference does about privacy, read from the code:

- Compression: every compressed vector has exactly k non-zero entries, each ±1 (the stochastic sign is drawn for
  every coordinate, then masked by the top-k indicator), so ‖c_j‖₂ = √k and one teacher moves the sum Σ_j c_j
  by at most 2√k (c_j' = −c_j). The reference charges each release `rdp_gaussian(logq, σ / √(2k), orders)`:
  its data-independent curve α / (σ²/2k) = α·(2√k)²/(2σ²) is the Gaussian's RDP at L2 sensitivity 2√k, so the
  sensitivity matches the vectors produced. But (1) the call is PATE's data-dependent GNMax bound: `logq`
  is computed from the noisy vote vector treated as GNMax counts, and the smaller data-dependent value is used
  where Theorem 6's conditions hold; that bound is for an argmax release, not for the released thresholded
  vector, its smooth sensitivity is never accounted, and ε, data-dependent, decides when training stops (at the
  README's settings q ≈ 1 − 1/784 and the condition fails, so the data-independent curve is what is charged).
  (2) Partitions: `evenly_partition_dataset` deals records class by class in round robin, T parts of ⌊N/T⌋,
  restarting a class from its first record when it runs out: on MNIST (classes of 5,421 to 6,742 records, N/10
  = 6,000 dealt per class) some records of the smaller classes go to TWO teachers (sensitivity 4√k for them),
  and adding one record reshuffles the parts of others. (3) Accounting is RDP over orders {1.1, 2, ..., 199}
  converted with ε = RDP − log δ / (α − 1), δ = 1e-5; σ is fixed and training stops at the first step whose ε
  exceeds the target.

Ours (add/remove-one adjacency): an i.i.d. uniform teacher per record (bench.baselines.pategan.draw_partition),
so the partitions of D and D ∪ {x} couple to differ by x in one teacher, every teacher trains every iteration on
draws of a data-independent count, and one record changes at most one teacher's c_j on every sample. Each noisy
release is Σ_j c_j + N(0, σ² I) on one generated sample: a Gaussian mechanism of L2 sensitivity 2√k (exact: the
compressed vectors are checked to have k entries in {−1, +1}, and c' = −c attains it), charged as one
GaussianDpEvent(σ / 2√k) per release (stage "votes", `count` releases, composed adaptively: every sample of a
batch is one release of its own, all of them seen by the same teachers). Everything after the noise
(threshold, generator, the fakes the teachers train on) is post-processing; the teachers' parameters are never
released (not in `state_dict`). The count is iterations · generator_batch_size, a function of the config: with
`sigma` unset the smallest σ whose composition meets the budget under the run's accountant (bench.privacy.calibrate);
with `sigma` set (the reference's way) training stops after the largest number of iterations that fits. No
data-dependent bound is computed, used for stopping, or reported.

Deviations from the reference, recorded here and in the config's field comments:
- the partition (i.i.d. teacher indices, not the class-balanced round robin) and the accounting above;
- teacher batches: B records drawn uniformly with replacement from the teacher's partition per step (the
  reference feeds a teacher's whole partition, ⌊N/T⌋ = 15 records, as one batch and sets the batch size to it);
- the networks are bench.nets.gan's DCGAN-style pair (GroupNorm, projection conditioning), not the reference's
  TensorFlow DCGAN with BatchNorm and one-hot concatenation; z ~ N(0, I), not U(−1, 1);
- fresh fakes for the teacher steps (the reference reuses the generator step's z of that iteration);
- `iterations` counts generator steps (the reference's `epoch`s: one generator step each, as its batch is a
  whole partition); random numbers from the run's generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from bench.baselines.pategan import PartitionedTeachers, largest_that_fits
from torch import Tensor

from bench.contract import DataSpec, ImageDataset, Progress, device_generator
from bench.errors import BenchError
from bench.nets import seeded_init
from bench.nets.gan import ConditionalGAN, Generator, generate
from bench.pixels import to_model_range
from bench.privacy import Budget, PrivacyLedger, Stage, calibrate, epsilon


@dataclass(frozen=True, kw_only=True)
class Config:
    teachers: int = 4000  # T teacher discriminators on T disjoint partitions, ≥ 2 (reference: 80 × 50 = 4,000)
    topk: int = 200  # k coordinates kept per compressed gradient, 1..C·H·W (reference: 200; 350 on FMNIST ε=10)
    threshold: float = 0.9  # β: a coordinate moves where |noisy vote sum| > β·T (reference `thresh`: 0.9 FMNIST ε=1)
    sigma: float | None = None  # Gaussian σ on the vote sums; None = calibrated to the budget (reference: fixed 5000)
    max_grad: float | None = 1e-5  # b's cap in the stochastic sign; None = max|g| only (reference `max_grad`: 1e-5)
    step_size: float = 1e-3  # α: the image target is x + α·d (reference: `learning_rate`, 1e-3)
    width: int = 64  # discriminator channels (c, 2c); generator mirrors (2c, c) (reference DCGAN: 64)
    latent_dim: int = 50  # z dimension (reference `z_dim`: 50; 64 on FMNIST ε=10)
    groups: int = 8  # GroupNorm groups (reference: BatchNorm)
    iterations: int = 300  # generator steps (reference `epoch`: 300, one generator step each)
    teacher_steps: int = 2  # teacher steps per iteration (reference `d_step`: 2)
    warmup_teacher_steps: int = 10  # teacher steps in the first iteration (reference `pretrain_teacher`: 10)
    batch_size: int = 15  # records per teacher step, from the teacher's partition, and as many fakes (reference: 15)
    generator_batch_size: int = 15  # generated samples per generator step = noisy releases (reference: 15)
    lr_teacher: float = 1e-3  # Adam (reference: 1e-3)
    lr_g: float = 1e-3  # Adam (reference: 1e-3)
    beta1: float = 0.5  # Adam β1 (reference: 0.5)
    beta2: float = 0.999
    teacher_batching: Literal["auto", "vmap", "loop"] = "auto"  # as pategan's: loop on a CPU, vmap elsewhere

    def __post_init__(self) -> None:
        if self.teachers < 2:
            raise ValueError(f"teachers (T) must be ≥ 2, got {self.teachers}")
        if self.topk < 1:
            raise ValueError(f"topk (k) must be ≥ 1, got {self.topk}")
        if self.sigma is not None and not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"threshold (β) must be ≥ 0, got {self.threshold}")
        if self.max_grad is not None and not (math.isfinite(self.max_grad) and self.max_grad > 0):
            raise ValueError(f"max_grad must be > 0 (or unset), got {self.max_grad}")
        sizes = ("width", "latent_dim", "groups", "iterations", "teacher_steps", "batch_size", "generator_batch_size")
        for key in (*sizes, "warmup_teacher_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be ≥ 1, got {getattr(self, key)}")
        if self.width % self.groups:
            raise ValueError(f"groups {self.groups} must divide width {self.width}")
        for key in ("step_size", "lr_teacher", "lr_g"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) > 0):
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)}")


# ------------------------------------------------------------------------------------ the mechanism


def sensitivity(k: int) -> float:
    """L2 sensitivity of the vote sum to one teacher: two vectors of k entries in {−1, +1} differ by ≤ 2√k."""
    return 2.0 * math.sqrt(k)


def compress(grads: Tensor, k: int, max_grad: float | None, generator: torch.Generator) -> Tensor:
    """Top-k stochastic sign (rdp_utils.stachastic_convert2topk): grads [..., D] -> float [..., D] with exactly k
    entries ±1 per row (the k largest |g|), 0 elsewhere. +1 with probability clip(1/2 + g/(2b), 0, 1), b = the
    row's max |g| capped at `max_grad`; a zero row has b = 0 and fair signs. Uniforms are drawn for the k kept
    coordinates only (the reference draws them for all and masks: the same distribution)."""
    mag = grads.abs()
    idx = mag.topk(k, dim=-1).indices  # [..., k]
    b = mag.amax(-1, keepdim=True)
    if max_grad is not None:
        b = b.clamp(max=max_grad)
    g = grads.gather(-1, idx)
    prob = (0.5 + g / (2 * b.clamp(min=torch.finfo(grads.dtype).tiny))).clamp(0.0, 1.0)
    u = torch.rand(g.shape, generator=generator, device=grads.device, dtype=grads.dtype)
    signs = torch.where(u <= prob, 1.0, -1.0).to(grads.dtype)  # reference: −1 where rand > prob
    return torch.zeros_like(grads).scatter_(-1, idx, signs)


def vote_sum(grads: Tensor, k: int, max_grad: float | None, generator: torch.Generator) -> Tensor:
    """The pre-noise aggregate: teachers' image gradients [T, B, D] -> Σ_j c_j, float [B, D]."""
    return compress(grads, k, max_grad, generator).sum(0)


def noisy_release(votes: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """votes [B, D] + N(0, σ²) on every entry: B releases, one per row (each charged)."""
    return votes + sigma * torch.randn(votes.shape, generator=generator, device=votes.device, dtype=votes.dtype)


def threshold_votes(noisy: Tensor, beta: float, teachers: int) -> Tensor:
    """The aggregated direction: +1 where noisy > β·T, −1 where noisy < −β·T, else 0."""
    cut = beta * teachers
    return (noisy > cut).to(noisy.dtype) - (noisy < -cut).to(noisy.dtype)


def votes_stage(sigma: float, k: int, count: int) -> Stage:
    """`count` releases of the vote sum at noise σ (noise multiplier σ over the sensitivity 2√k)."""
    return Stage(
        name="votes",
        mechanism="gaussian",
        noise_multiplier=sigma / sensitivity(k),
        count=count,
        sensitivity=(
            f"L2 2·sqrt(k) = {sensitivity(k):.6g} per generated sample: one record is in one teacher's i.i.d. "
            f"partition and changes that teacher's top-{k} ±1 vector only (add/remove-one). The reference charged "
            "PATE's data-dependent GNMax bound (rdp_gaussian) at σ/sqrt(2k) on class-balanced round-robin partitions "
            "that can repeat records; here: the data-independent Gaussian, i.i.d. partitions"
        ),
    )


def noise_and_iterations(cfg: Config, budget: Budget) -> tuple[float, int]:
    """(σ on the vote sums, iterations) for the budget; a function of the config only."""
    per_iteration, k = cfg.generator_batch_size, cfg.topk
    if cfg.sigma is None:
        q = cfg.iterations * per_iteration
        s = calibrate(
            budget.epsilon, lambda s: [votes_stage(s * sensitivity(k), k, q)], budget.delta, budget.accountant
        )
        return s * sensitivity(k), cfg.iterations
    sigma = cfg.sigma

    def fits(iterations: int) -> bool:
        return epsilon([votes_stage(sigma, k, iterations * per_iteration)], budget.delta, budget.accountant) <= (
            budget.epsilon
        )

    if not fits(1):
        raise BenchError(
            f"datalens: σ = {sigma:g} on the vote sums spends more than ε = {budget.epsilon:g} on one iteration's "
            f"{per_iteration} releases; raise sigma, or leave it unset to calibrate"
        )
    return sigma, largest_that_fits(fits, cfg.iterations)


# ---------------------------------------------------------------------------------------- the method


class DataLens(PartitionedTeachers, ConditionalGAN):
    name: ClassVar[str] = "datalens"
    version: ClassVar[int] = 1  # bump when a change of this file changes its results (a new run key)
    Config: ClassVar[type] = Config

    def __init__(self, config: Any, *, spec: DataSpec, device: torch.device) -> None:
        dim = spec.channels * spec.height * spec.width
        if config.topk > dim:
            raise BenchError(f"datalens: topk {config.topk} exceeds the {dim} pixels of a {spec.channels}×"
                             f"{spec.height}×{spec.width} image")  # fmt: skip
        super().__init__(config, spec=spec, device=device)

    def _build(self) -> None:
        cfg, spec = self.config, self.spec
        self.G = Generator(
            channels=spec.channels,
            height=spec.height,
            width=spec.width,
            num_classes=spec.num_classes,
            latent_dim=cfg.latent_dim,
            width_c=cfg.width,
            groups=cfg.groups,
        ).to(self.device)

    def noise_and_iterations(self, budget: Budget) -> tuple[float, int]:
        return noise_and_iterations(self.config, budget)

    @classmethod
    def work(cls, config: Any, num_records: int, budget: Budget) -> dict[str, int]:
        """{stage: units of work} of a fit (bench.contract, optional members: `work`)."""
        return {"iterations": noise_and_iterations(config, budget)[1]}

    # -------------------------------------------------------------------------------------------- fit

    def fit(
        self, train: ImageDataset, *, budget: Budget, generator: torch.Generator, progress: Progress
    ) -> PrivacyLedger:
        cfg = self.config
        self._check_teachers(len(train))
        self.sigma, iterations = self.noise_and_iterations(budget)
        self._prepare(train, generator)
        self._run_iterations(
            progress, iterations, f"datalens σ={self.sigma:.4g} T={cfg.teachers} k={cfg.topk} β={cfg.threshold:g}"
        )
        ledger = PrivacyLedger()
        ledger.add(votes_stage(self.sigma, cfg.topk, self.releases))
        return ledger

    def _prepare(self, train: ImageDataset, generator: torch.Generator) -> None:
        """Networks, the partition (drawn once, from a generator of its own seeded by one draw) and optimizers."""
        cfg, dev = self.config, self.device
        with seeded_init(generator):
            self._build()
            self._build_teachers()
        self._draw_partition(train, cfg.teachers, generator)
        self.generator = generator
        self.noise_gen = device_generator(generator, dev)
        betas = (cfg.beta1, cfg.beta2)
        self.opt_t = torch.optim.Adam(self.teachers.parameters(), lr=cfg.lr_teacher, betas=betas)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr_g, betas=betas)
        self.iteration = self.releases = 0

    def _latents(self, n: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, self.spec.num_classes, (n,), generator=self.noise_gen, device=self.device)
        z = torch.randn(n, self.config.latent_dim, generator=self.noise_gen, device=self.device)
        return z, y

    def _iteration(self) -> None:
        cfg = self.config
        steps = cfg.warmup_teacher_steps if self.iteration == 0 else cfg.teacher_steps
        for _ in range(steps):
            self._teacher_step()
        self._generator_step()
        self.iteration += 1

    def _teacher_step(self) -> None:
        """All T teachers, each on B of its own partition's records (uniform, with replacement) vs B fakes."""
        T, B, dev = self.config.teachers, self.config.batch_size, self.device
        u = torch.rand(T, B, generator=self.noise_gen, device=dev)  # T·B draws, whatever the sizes
        slot = (u * self._sizes.clamp(min=1).unsqueeze(1)).long()
        rows = torch.arange(T, device=dev).unsqueeze(1)
        x_real = to_model_range(self._part_x[rows, slot])  # [T, B, C, H, W], teacher j's records only
        y_real = self._part_y[rows, slot]
        z, y_fake = self._latents(B)
        with torch.no_grad():
            fake = self.G(z, y_fake)
        x = torch.cat([x_real, fake.expand(T, *fake.shape)], dim=1)  # [T, 2B, C, H, W]
        y = torch.cat([y_real, y_fake.expand(T, B)], dim=1)
        logits = self.teachers(x, y)  # [T, 2B]
        has_data = (self._sizes > 0).float()  # an empty partition's teacher only sees fakes
        loss = (has_data * F.softplus(-logits[:, :B]).mean(1)).sum() + F.softplus(logits[:, B:]).mean(1).sum()
        self.opt_t.zero_grad(set_to_none=True)
        loss.backward()  # each teacher's gradient is that of its own loss: the sum separates
        self.opt_t.step()

    def teacher_image_grads(self, fake: Tensor, y: Tensor) -> Tensor:
        """Every teacher's −∂ mean_B softplus(−T_j(x, y)) / ∂x at the same images: float [T, B, C·H·W]
        (the reference's `img_grads`; teacher j's row depends on teacher j only)."""
        T, B = self.config.teachers, fake.shape[0]
        x = fake.detach().expand(T, *fake.shape).clone().requires_grad_(True)
        logits = self.teachers(x, y.expand(T, B))  # [T, B]
        (grad,) = torch.autograd.grad(F.softplus(-logits).mean(1).sum(), x)
        return (-grad).flatten(2)

    def _generator_step(self) -> None:
        cfg = self.config
        z, y = self._latents(cfg.generator_batch_size)
        fake = self.G(z, y)
        grads = self.teacher_image_grads(fake, y)
        votes = vote_sum(grads, cfg.topk, cfg.max_grad, self.noise_gen)  # [B, D], pre-noise
        noisy = noisy_release(votes, self.sigma, self.noise_gen)
        self.releases += noisy.shape[0]  # every noisy release computed is charged
        direction = threshold_votes(noisy, cfg.threshold, cfg.teachers).view_as(fake)
        target = (fake + cfg.step_size * direction).detach()
        loss = (target - fake).pow(2).sum()
        self.opt_g.zero_grad(set_to_none=True)
        params = list(self.G.parameters())
        for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):
            p.grad = g
        self.opt_g.step()
        self.teachers.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------- checkpointing

    def _training_state(self) -> dict[str, Any]:
        """Everything to resume (teachers and partition included: a training checkpoint, never released)."""
        return {
            "model": self.state_dict(),
            "teachers": self.teachers.state_dict(),
            "teacher_of": self.partition.teacher_of,
            "optimizers": [opt.state_dict() for opt in (self.opt_t, self.opt_g)],
            "iteration": self.iteration,
            "releases": self.releases,
            "generator": self.generator.get_state(),
            "noise_generator": self.noise_gen.get_state(),
        }

    def _load_training_state(self, state: dict[str, Any]) -> None:
        self._restore_partition(state["teacher_of"], self.config.teachers)
        self.load_state_dict(state["model"])
        self.teachers.load_state_dict(state["teachers"])
        for opt, s in zip((self.opt_t, self.opt_g), state["optimizers"], strict=True):
            opt.load_state_dict(s)
        self.iteration, self.releases = int(state["iteration"]), int(state["releases"])
        self.generator.set_state(state["generator"])
        self.noise_gen.set_state(state["noise_generator"])

    # ----------------------------------------------------------------------------------------- sample

    def sample(self, n: int, *, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        """uint8 [n, C, H, W] from the generator, conditioned on int64 `labels` [n]."""
        if labels is None:
            raise BenchError(f"{self.name} is class-conditional: sample() needs labels")
        return generate(self.G, n, labels, generator=generator, device=self.device)

    def released_model(self) -> torch.nn.Module:
        return self.G

    def state_dict(self) -> dict[str, Any]:
        """The released network: the generator (post-processing of the noisy votes). Never the teachers."""
        return {"generator": self.G.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.G.load_state_dict(state["generator"])
