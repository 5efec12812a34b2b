"""G-PATE (Long, Wang, Yang, Kailkhura, Zhang, Gunter, Li, NeurIPS 2021) with data-independent accounting.

Reproduces the mechanism of AI-secure/G-PATE@ad7279a2815c48e2554ac1c4864a4de5c8e607ee:model.py (`train_together`,
`aggregate_results`) with rdp_utils.py (`gradient_voting_rdp`, `gnmax_thresh_aggregator`), the README's MNIST
commands (ε=1: 40×100 = 4,000 teachers, --sigma_thresh 3000 --sigma 1000 --step_size 1e-4 --z_dim 50 --batch_size
64; ε=10: 40×50 = 2,000 teachers, --sigma_thresh 600 --sigma 100 --z_dim 100), and DPImageBench's port,
2019ChenGong/DPImageBench@ad3972b68ef0a55a3b0be05cbaf8e2615215886c:models/g_pate.py with models/G_PATE/model.py and
models/G_PATE/rdp_utils.py (the same code, data from a loader), configs at
2019ChenGong/DPImageBench@378296cb9143e40a280296ec9073fb9989e582af:configs/G-PATE/{mnist,fmnist}_28_eps{1.0,10.0}.yaml
(the last commit that has them: 93dc232 removed them, 6fc5e66 the code; HEAD 565f8d7 has neither, and its README
publishes no G-PATE result).

    t_i ~ U{0..k−1} for every record i, drawn ONCE from the run's seed: k disjoint partitions P_j
    repeat `iterations` times:
        teacher step:    ALL k teachers, teacher j on B records drawn from P_j only vs B shared fakes (BCE)
        generator step:  B_g fakes x_b = G(z_b, y_b); each teacher's gradient g_jb = −∂ mean_b BCE(D_j(x_b), 1)/∂x_b
                         per fake b: a fresh random projection P_b (D × d, entries N(0, 1/d)), v_jb = clip(g_jb P_b, ±c)
                         per projected dimension: the votes of the k teachers in `bins` equal bins of [−c, c]
                           n = histogram (sums to k)                                    ── one QUERY
                           threshold check  max(n) + N(0, σ_t²) ≥ threshold·k        (noisy answer 1)
                           noisy argmax     argmax(n + N(0, σ² I))                     (noisy answer 2)
                           the bin centre if the check passed, else 0
                         a_b = (answers of b) P_bᵀ; the generator regresses on x_b + a_b: Σ (G(z, y) − (x_b + a_b))²

Privacy (add/remove-one adjacency). Partition by an independent uniform teacher index per record (as pategan; not
the reference's equal split of a shuffled list, where adding a record moves other records to other teachers).
With i.i.d. indices the partitions of D and D ∪ {x} couple so that they differ only by x in x's teacher, and
every other teacher's training draws are identical (uniforms of a data-independent count, k·B, scaled by the
partition sizes). Every teacher trains at every iteration, so no state depends on a secret selection. The fakes
teachers train on and query with come from the generator: post-processing of past answers (adaptive
composition). So one record changes at most one teacher's vote on every histogram: one count −1, another +1: L2
sensitivity √2 of a histogram, 1 of its maximum. Every query computes BOTH noisy answers, whatever the threshold
check says (the reference computes the argmax only when the check passes; our argmax for a failed check is
computed, charged and discarded), so the number of answers is iterations · B_g · d, a function of the config
only. The ledger charges stage "threshold" (Gaussian, noise multiplier σ_t / 1, one per query; absent with
threshold = 0, which drops the check) and stage "votes" (Gaussian, σ / √2, one per query). Calibration: with σ
unset, the smallest σ (bench.privacy.calibrate) with σ_t = thresh_ratio · σ whose composition meets the budget
over the fixed number of queries; with σ and σ_t fixed (the reference's values), training stops after the
largest number of iterations whose queries fit the budget. The teachers' parameters and the partition are never
released (not in `state_dict`; only in the training checkpoint).

What the reference does and we do not:
- Data-dependent ε: `gnmax_thresh_aggregator` charges the data-dependent RDP bound of "Scalable Private Learning
  with PATE" (compute_logpr_answered, compute_logq_gaussian: it depends on the vote counts), never sanitised with
  smooth sensitivity, and training stops when that ε exceeds --max_eps. A data-dependent ε is not a DP guarantee
  unless released privately (it is not). Ours is data-independent (above); at the reference's σs the budget buys
  far fewer queries: 192 iterations of 15 fakes (28,800 queries) at ε = 1 on MNIST, 58 of 30 at ε = 10.
- Partition: `partition_dataset` splits the (shuffled, with a fixed seed 307) array into k equal contiguous
  slices: under add/remove adjacency one record shifts the slice boundaries and moves up to k − 1 other records.
- The argmax is drawn only when the threshold check passes (so the number of answers depends on the data).
- Its batch size shrinks to the partition size when a partition is smaller than --batch_size (15 with 4,000
  teachers on 60,000 records): here a config value (the paper profile sets it), never a function of the data.

Deviations from the reference (recorded in every run's config by the fields named):
- data-independent accounting, i.i.d. partition, argmax always computed (above);
- networks: bench.nets.gan (GroupNorm, projection-conditioned discriminator, `width`) instead of its DCGAN with
  batch norm and label concatenation; pixels in [−1, 1] with a tanh generator instead of [0, 1] with a sigmoid;
- teacher batches: B records drawn uniformly with replacement from the teacher's own partition (its sequential
  slices); the B fakes shared by all teachers carry uniform random labels (the reference conditions them on the
  real batch's labels, one forward per teacher); z ~ N(0, I) instead of U(−1, 1), a new z for the generator step;
- one random projection per fake per step from the run's generator (the reference draws one per fake too, from
  numpy's global RNG via sklearn's GaussianRandomProjection);
- Adam for the teachers and the generator with the reference's lr 1e-3, β1 0.5 (`lr_teacher`, `lr_g`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from bench.baselines.pategan import (
    Partition,
    PartitionedTeachers,
    draw_partition,
    largest_that_fits,
    partition_of,
)
from torch import Tensor

from bench.contract import ImageDataset, Progress, device_generator
from bench.errors import BenchError
from bench.nets import seeded_init
from bench.nets.gan import ConditionalGAN, Generator, generate
from bench.pixels import to_model_range
from bench.privacy import Budget, PrivacyLedger, Stage, calibrate, epsilon

L2_SENSITIVITY = math.sqrt(2.0)  # a vote histogram: one teacher's vote moves, one count −1, another +1
THRESHOLD_SENSITIVITY = 1.0  # the maximum count of a histogram moves by at most 1
REFERENCE = "AI-secure/G-PATE@ad7279a2815c48e2554ac1c4864a4de5c8e607ee:model.py"

__all__ = ["GPATE", "Config", "Partition", "draw_partition", "partition_of"]


@dataclass(frozen=True, kw_only=True)
class Config:
    teachers: int = 2000  # k teacher discriminators on k disjoint partitions (reference: 4,000 at ε=1, 2,000 at ε=10)
    width: int = 64  # discriminator channels (c, 2c); generator mirrors (2c, c)
    latent_dim: int = 100  # z dimension (reference --z_dim: 50 at ε=1, 100 at ε=10)
    groups: int = 8  # GroupNorm groups
    iterations: int = 1000  # outer iterations (one teacher step, one generator step); at most, see sigma
    batch_size: int = 64  # per teacher step: records of each teacher's partition, and as many fakes
    generator_batch_size: int = 64  # fakes per generator step; each gives proj_dim queries
    proj_dim: int = 10  # random projection dimension d (reference --pca_dim 10)
    bins: int = 10  # vote bins on [−step_size, step_size] (reference: nbins = 10)
    step_size: float = 1e-4  # clip bound c of the projected gradients and range of the bins (--step_size)
    threshold: float = 0.5  # check max count + N(0, σ_t²) ≥ threshold·k (--thresh 0.5); 0 = no check (GNMax)
    sigma: float | None = None  # σ on each count of the argmax; None = calibrated to the budget (thresh_ratio·σ)
    sigma_thresh: float | None = None  # σ_t of the threshold check; set with sigma (the reference's values)
    thresh_ratio: float = 3.0  # σ_t / σ when calibrating (reference ε=1: 3000 / 1000)
    lr_teacher: float = 1e-3  # Adam, teachers (reference --learning_rate 1e-3)
    lr_g: float = 1e-3  # Adam, generator
    beta1: float = 0.5  # Adam β1 (reference 0.5)
    beta2: float = 0.999
    # accounting: "data-independent" is the only choice (the reference's data-dependent RDP is not offered)
    accounting: Literal["data-independent"] = "data-independent"
    # "auto": a Python loop of k modules on a CPU, one vmapped network on an accelerator (bench.nets.gan)
    teacher_batching: Literal["auto", "vmap", "loop"] = "auto"

    def __post_init__(self) -> None:
        if self.teachers < 2:
            raise ValueError(f"teachers (k) must be ≥ 2, got {self.teachers}")
        if self.bins < 2:
            raise ValueError(f"bins must be ≥ 2, got {self.bins}")
        for key in ("width", "latent_dim", "groups", "iterations", "batch_size", "generator_batch_size", "proj_dim"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be ≥ 1, got {getattr(self, key)}")
        if self.width % self.groups:
            raise ValueError(f"groups {self.groups} must divide width {self.width}")
        if not (math.isfinite(self.step_size) and self.step_size > 0):
            raise ValueError(f"step_size (clip bound of the projected gradients) must be > 0, got {self.step_size}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(
                f"threshold must be in [0, 1] (a fraction of the teachers; 0 = no check), got {self.threshold}"
            )
        for key in ("sigma", "sigma_thresh"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{key} must be a finite number > 0, got {value}")
        if not (math.isfinite(self.thresh_ratio) and self.thresh_ratio > 0):
            raise ValueError(f"thresh_ratio must be > 0, got {self.thresh_ratio}")
        if self.threshold == 0 and self.sigma_thresh is not None:
            raise ValueError("sigma_thresh applies to the threshold check; threshold = 0 drops it")
        if self.threshold > 0 and (self.sigma is None) != (self.sigma_thresh is None):
            raise ValueError("set sigma and sigma_thresh together (fixed noise), or neither (calibrated)")
        for key in ("lr_teacher", "lr_g"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)}")

    @property
    def queries_per_iteration(self) -> int:
        """Histograms answered per iteration (each: a threshold check and an argmax)."""
        return self.generator_batch_size * self.proj_dim

    @property
    def threshold_count(self) -> float | None:
        return self.threshold * self.teachers if self.threshold > 0 else None


# ------------------------------------------------------------------------------------ the mechanism


def vote_histograms(projected: Tensor, *, step_size: float, bins: int) -> Tensor:
    """Teachers' projected gradients float [k, B, d] -> vote counts float [B, d, bins] (each row sums to k): every
    value clipped to [−c, c] and counted in one of `bins` equal bins (the top edge in the last, as np.histogram)."""
    c = step_size
    index = ((projected.clamp(-c, c) + c) / (2 * c) * bins).floor().long().clamp(0, bins - 1)
    return F.one_hot(index, bins).sum(0).float()


def bin_centres(step_size: float, bins: int, device: torch.device | str = "cpu") -> Tensor:
    width = 2 * step_size / bins
    return -step_size + width * (torch.arange(bins, device=device, dtype=torch.float32) + 0.5)


def add_noise(values: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
    """values + N(0, σ²) on every entry (the only place the aggregation draws noise)."""
    return values + sigma * torch.randn(values.shape, generator=generator, device=values.device)


def aggregate(
    counts: Tensor, *, sigma: float, sigma_thresh: float, threshold_count: float | None, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Confident-GNMax on every histogram, both answers always computed: counts [B, d, bins] -> (bin int64 [B, d],
    answered bool [B, d]). The check max(n) + N(0, σ_t²) ≥ threshold_count (drawn first, as the reference), then
    argmax(n + N(0, σ²)); the argmax of a failed check is drawn too and its result discarded by the caller."""
    if threshold_count is None:
        answered = torch.ones(counts.shape[:-1], dtype=torch.bool, device=counts.device)
    else:
        answered = add_noise(counts.amax(-1), sigma_thresh, generator) >= threshold_count
    index = add_noise(counts, sigma, generator).argmax(-1)
    return index, answered


def query_stages(cfg: Config, sigma: float, sigma_thresh: float, queries: int) -> list[Stage]:
    """What `queries` histograms answered at (σ, σ_t) cost: a threshold check and an argmax each."""
    stages = []
    if cfg.threshold_count is not None:
        stages.append(
            Stage(
                name="threshold",
                mechanism="gaussian",
                noise_multiplier=sigma_thresh / THRESHOLD_SENSITIVITY,
                count=queries,
                sensitivity="max count of a vote histogram over k teachers on disjoint i.i.d. partitions: one record "
                "moves one teacher's vote, the max by ≤ 1; one check per query, passed or not (data-independent count; "
                "the reference's data-dependent RDP is not used)",
            )
        )
    stages.append(
        Stage(
            name="votes",
            mechanism="gaussian",
            noise_multiplier=sigma / L2_SENSITIVITY,
            count=queries,
            sensitivity="vote histogram of one projected gradient dimension over k teachers on disjoint i.i.d. "
            "partitions: one record moves one teacher's vote between two bins, L2 √2; the noisy argmax is computed "
            "and charged for every query, also when the threshold check fails",
        )
    )
    return stages


def noise_and_iterations(cfg: Config, budget: Budget) -> tuple[float, float, int]:
    """(σ, σ_t, iterations) for the budget; a function of the config only."""
    per_iteration = cfg.queries_per_iteration
    if cfg.sigma is None:
        q = cfg.iterations * per_iteration
        ratio = cfg.thresh_ratio
        s = calibrate(
            budget.epsilon, lambda s: query_stages(cfg, s, ratio * s, q), budget.delta, budget.accountant,
            bracket=(1.0, 2.0),
        )  # fmt: skip
        return s, ratio * s, cfg.iterations
    sigma = cfg.sigma
    sigma_t = cfg.sigma_thresh if cfg.sigma_thresh is not None else math.inf

    def fits(iterations: int) -> bool:
        stages = query_stages(cfg, sigma, sigma_t, iterations * per_iteration)
        return epsilon(stages, budget.delta, budget.accountant) <= budget.epsilon

    if not fits(1):
        raise BenchError(
            f"gpate: σ = {sigma:g}, σ_t = {sigma_t:g} spend more than ε = {budget.epsilon:g} on one iteration's "
            f"{per_iteration} queries; raise them, or leave them unset to calibrate"
        )
    return sigma, sigma_t, largest_that_fits(fits, cfg.iterations)


# ---------------------------------------------------------------------------------------- the method


class GPATE(PartitionedTeachers, ConditionalGAN):
    name: ClassVar[str] = "gpate"
    version: ClassVar[int] = 1  # bump when a change of this file changes its results (a new run key)
    Config: ClassVar[type] = Config

    def _build(self) -> None:
        cfg, spec = self.config, self.spec
        self.G = Generator(
            channels=spec.channels, height=spec.height, width=spec.width, num_classes=spec.num_classes,
            latent_dim=cfg.latent_dim, width_c=cfg.width, groups=cfg.groups,
        ).to(self.device)  # fmt: skip

    def noise_and_iterations(self, budget: Budget) -> tuple[float, float, int]:
        return noise_and_iterations(self.config, budget)

    @classmethod
    def work(cls, config: Any, num_records: int, budget: Budget) -> dict[str, int]:
        """{stage: units of work} of a fit (bench.contract, optional members: `work`)."""
        return {"iterations": noise_and_iterations(config, budget)[2]}

    # -------------------------------------------------------------------------------------------- fit

    def fit(
        self, train: ImageDataset, *, budget: Budget, generator: torch.Generator, progress: Progress
    ) -> PrivacyLedger:
        cfg = self.config
        self._check_teachers(len(train))
        self.sigma, self.sigma_thresh, iterations = self.noise_and_iterations(budget)
        self._prepare(train, generator)
        self._run_iterations(
            progress, iterations, f"gpate σ={self.sigma:.3g} σ_t={self.sigma_thresh:.3g} k={cfg.teachers}"
        )
        ledger = PrivacyLedger()
        for stage in query_stages(cfg, self.sigma, self.sigma_thresh, self.queries):
            ledger.add(stage)
        return ledger

    def _prepare(self, train: ImageDataset, generator: torch.Generator) -> None:
        """Networks, the partition (drawn once, from its own generator seeded by one draw) and optimizers."""
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
        self.iteration = self.queries = self.answered = 0
        self._centres = bin_centres(cfg.step_size, cfg.bins, dev)

    def _fakes(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """(z, y, G(z, y) without gradient) for n fakes, y ~ U{classes}."""
        y = torch.randint(0, self.spec.num_classes, (n,), generator=self.noise_gen, device=self.device)
        z = torch.randn(n, self.config.latent_dim, generator=self.noise_gen, device=self.device)
        with torch.no_grad():
            return z, y, self.G(z, y)

    def _iteration(self) -> None:
        self._teacher_step()
        self._generator_step()
        self.iteration += 1

    def _teacher_step(self) -> None:
        """All k teachers, each on B of its own partition's records (uniform, with replacement) vs B shared fakes."""
        k, B = self.config.teachers, self.config.batch_size
        u = torch.rand(k, B, generator=self.noise_gen, device=self.device)  # k·B draws, whatever the sizes
        slot = (u * self._sizes.clamp(min=1).unsqueeze(1)).long()  # [k, B] in 0..size_j−1
        rows = torch.arange(k, device=self.device).unsqueeze(1)
        x_real = to_model_range(self._part_x[rows, slot])  # [k, B, C, H, W], teacher j's records only
        y_real = self._part_y[rows, slot]
        _, y_fake, fake = self._fakes(B)
        x = torch.cat([x_real, fake.expand(k, *fake.shape)], dim=1)  # [k, 2B, C, H, W]
        y = torch.cat([y_real, y_fake.expand(k, B)], dim=1)
        logits = self.teachers(x, y)  # [k, 2B]
        has_data = (self._sizes > 0).float()  # an empty partition's teacher only sees fakes
        loss = (has_data * F.softplus(-logits[:, :B]).mean(1)).sum() + F.softplus(logits[:, B:]).mean(1).sum()
        self.opt_t.zero_grad(set_to_none=True)
        loss.backward()  # each teacher's gradient is that of its own loss: the sum separates
        self.opt_t.step()

    def teacher_gradients(self, fake: Tensor, y: Tensor) -> Tensor:
        """Each teacher's image gradient −∂ mean_b softplus(−D_j(x_b, y_b)) / ∂x_b (the reference's `img_grads`):
        fake [B, C, H, W] -> float [k, B, C·H·W]. No teacher parameter gets a gradient."""
        k, B = self.config.teachers, fake.shape[0]
        x = fake.detach().unsqueeze(0).expand(k, *fake.shape).clone().requires_grad_(True)
        logits = self.teachers(x, y.expand(k, B))  # teacher j on its own copy: its gradient alone
        (grad,) = torch.autograd.grad(F.softplus(-logits).mean(1).sum(), x)
        return -grad.reshape(k, B, -1)

    def _generator_step(self) -> None:
        cfg, dev = self.config, self.device
        B, d = cfg.generator_batch_size, cfg.proj_dim
        z, y, fake = self._fakes(B)
        grads = self.teacher_gradients(fake, y)  # [k, B, D]
        D = grads.shape[-1]
        proj = torch.randn(B, D, d, generator=self.noise_gen, device=dev) / math.sqrt(d)  # one per fake, N(0, 1/d)
        counts = vote_histograms(
            torch.einsum("kbD,bDd->kbd", grads, proj), step_size=cfg.step_size, bins=cfg.bins
        )  # [B, d, bins]
        index, answered = aggregate(
            counts, sigma=self.sigma, sigma_thresh=self.sigma_thresh, threshold_count=cfg.threshold_count,
            generator=self.noise_gen,
        )  # fmt: skip
        self.queries += counts.shape[0] * counts.shape[1]  # every noisy answer computed is charged
        self.answered += int(answered.sum())
        step = self._centres[index] * answered  # [B, d]; 0 where the check failed
        target = fake + torch.einsum("bd,bDd->bD", step, proj).reshape(fake.shape)
        loss = (self.G(z, y) - target).pow(2).sum()  # the reference's g_loss
        self.opt_g.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_g.step()

    # ------------------------------------------------------------------------------- checkpointing

    def _training_state(self) -> dict[str, Any]:
        """Everything to resume (teachers and partition included: a training checkpoint, never released)."""
        return {
            "model": self.state_dict(),
            "teachers": self.teachers.state_dict(),
            "teacher_of": self.partition.teacher_of,
            "optimizers": [opt.state_dict() for opt in (self.opt_t, self.opt_g)],
            "iteration": self.iteration,
            "queries": self.queries,
            "answered": self.answered,
            "generator": self.generator.get_state(),
            "noise_generator": self.noise_gen.get_state(),
        }

    def _load_training_state(self, state: dict[str, Any]) -> None:
        self._restore_partition(state["teacher_of"], self.config.teachers)
        self.load_state_dict(state["model"])
        self.teachers.load_state_dict(state["teachers"])
        for opt, s in zip((self.opt_t, self.opt_g), state["optimizers"], strict=True):
            opt.load_state_dict(s)
        self.iteration, self.queries = int(state["iteration"]), int(state["queries"])
        self.answered = int(state["answered"])
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
        """The released network: the generator (post-processing of the noisy answers). Never the teachers."""
        return {"generator": self.G.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.G.load_state_dict(state["generator"])
