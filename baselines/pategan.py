"""PATE-GAN (Jordon, Yoon, van der Schaar, ICLR 2019) with data-independent accounting.

    t_i ~ U{0..k−1} for every record i, drawn ONCE from the run's seed: k disjoint partitions P_j
    repeat `iterations` times:
        teacher_steps ×  teacher j: B records drawn from P_j only, vs B generated samples; one step of
                         all k teachers (one vmapped network, or a loop on a CPU: `teacher_batching`)
        student_steps ×  B_s generated samples (z, y ~ U{classes}); each is one QUERY:
                           votes  v_j = [T_j(x, y) > 0]  (1 = real)
                           counts n = (#{j: v_j = 0}, #{j: v_j = 1})
                           ñ = n + Lap(1/λ) per count        (or n + N(0, σ²): GNMax)
                           label = argmax ñ; the student S takes a BCE step on (x, y, label)
        generator step:  softplus(−S(G(z, y), y)) — G only ever sees the student

Privacy (add/remove-one adjacency). Partition by an independent uniform teacher index per record (not
an equal-size split of a shuffled list: there, adding a record moves others to other teachers). With
i.i.d. indices the partitions of D and D ∪ {x} can be coupled so that they differ only by x in x's
teacher, and every other teacher's training draws are identical (the draws are made from uniforms of a
data-independent count). So one record changes at most one teacher's vote on any query: one count
−1, another +1, L1 sensitivity 2, L2 sensitivity √2. Laplace noise of scale b = 1/λ on each count is
therefore dp_accounting's LaplaceDpEvent(b / 2) (its parameter is the scale over the L1 sensitivity),
i.e. (2λ, 0)-DP per query; Gaussian noise σ on each count is GaussianDpEvent(σ / √2). The ledger
charges one such event per noisy answer actually computed (stage "votes", `count` answers), composed
adaptively. Everything downstream of the noisy answers (student, generator, the fakes the teachers
train on) is post-processing; the teachers' parameters are never released (not in `state_dict`).

Calibration, data-independent: the number of queries Q = iterations · student_steps · student_batch_size
is fixed by the config; with `lam` unset the noise scale is the smallest one (bench.privacy.calibrate)
whose Q-fold composition meets the budget under the run's accountant. With `lam` (or `gnmax_sigma`)
set, training stops after the largest number of iterations whose queries still fit the budget — a
function of the config only. No data-dependent ε (PATE's smooth-sensitivity analysis) is computed,
used for stopping, or reported. Images are scaled with fixed constants; no statistic of the private
data is computed outside the mechanism.

Provenance: written from the paper's algorithm, not from a repository. The authors' 2018 code was read, as
archived by Ganev et al. (spalabucr/pategan-audit@d457ac77b4bb94a045fec100f12c9c643420e54f:
code/pate_gans/original/original.py, from mvdschaar/mlforhealthlabpub@0b0190b: alg/pategan/PATE_GAN.py), and
deliberately not reproduced: it trains one WGAN-GP discriminator on all records (no teachers, no partition, no
student), adds Gaussian noise to the real/fake LABELS rather than to vote counts, min-max normalises with the
private data's own statistics, and computes its noise scale with `10 ^ delta` (a bitwise XOR). The other
public PATE-GAN codes were not reproduced either: Ganev et al. (2024) found privacy violations in six of them
(among them noise on the labels instead of the counts, and data-dependent accounting), which the choices above
avoid. Deviations from the paper: data-independent accounting instead of its moments-accountant bound, a
partition by i.i.d. teacher indices, image networks (bench.nets.gan) instead of its tabular MLPs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.contract import ImageDataset, Progress, device_generator
from bench.errors import BenchError
from bench.nets import seeded_init
from bench.nets.gan import ConditionalGAN, Discriminator, TeacherBank, TeacherList, build_pair, generate
from bench.pixels import to_model_range
from bench.privacy import Budget, PrivacyLedger, Stage, calibrate, epsilon

L1_SENSITIVITY = 2.0  # one teacher's vote moves: one count −1, another +1
L2_SENSITIVITY = math.sqrt(2.0)


@dataclass(frozen=True, kw_only=True)
class Config:
    teachers: int = 10  # k teacher discriminators on k disjoint partitions (≥ 2)
    width: int = 64  # discriminator channels (c, 2c), teachers and student; generator mirrors (2c, c)
    latent_dim: int = 100  # z dimension (DCGAN: 100)
    groups: int = 8  # GroupNorm groups
    iterations: int = 1000  # outer iterations (teacher, student, generator steps)
    teacher_steps: int = 1  # teacher steps per iteration (≥ 1)
    student_steps: int = 1  # student steps per iteration (≥ 1); each answers student_batch_size queries
    batch_size: int = 64  # per teacher step: records from each teacher's partition, and as many fakes
    student_batch_size: int = 64  # generated samples labelled by noisy votes per student step (queries)
    generator_batch_size: int = 64  # generated samples per generator step
    aggregator: Literal["laplace", "gnmax"] = "laplace"  # noise on the vote counts
    lam: float | None = None  # Laplace: noise scale 1/λ on each count; None = calibrated to the budget
    gnmax_sigma: float | None = None  # GNMax: Gaussian σ on each count; None = calibrated to the budget
    lr_teacher: float = 2e-4  # Adam, teachers
    lr_student: float = 2e-4  # Adam, student
    lr_g: float = 2e-4  # Adam, generator
    beta1: float = 0.5  # Adam β1 (DCGAN: 0.5)
    beta2: float = 0.999
    # "vmap": the k teachers as one network (parameters stacked, torch.func.vmap: grouped convolutions);
    # "loop": k modules in a Python loop. "auto": loop on a CPU, where oneDNN's grouped convolutions
    # made vmap 1.1-2.8x slower (benchmarks/bench_gan.py, k = 10-100), vmap on an accelerator.
    teacher_batching: Literal["auto", "vmap", "loop"] = "auto"

    def __post_init__(self) -> None:
        if self.teachers < 2:
            raise ValueError(f"teachers (k) must be ≥ 2, got {self.teachers}")
        for key in ("teacher_steps", "student_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} (discriminator steps per iteration) must be ≥ 1, got {getattr(self, key)}")
        sizes = ("width", "latent_dim", "groups", "iterations", "batch_size", "student_batch_size")
        for key in (*sizes, "generator_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be ≥ 1, got {getattr(self, key)}")
        if self.width % self.groups:
            raise ValueError(f"groups {self.groups} must divide width {self.width}")
        if self.lam is not None and not (math.isfinite(self.lam) and self.lam > 0):
            raise ValueError(f"lam (λ, Laplace scale 1/λ) must be > 0, got {self.lam}")
        if self.gnmax_sigma is not None and not (math.isfinite(self.gnmax_sigma) and self.gnmax_sigma > 0):
            raise ValueError(f"gnmax_sigma must be > 0, got {self.gnmax_sigma}")
        if self.lam is not None and self.aggregator != "laplace":
            raise ValueError(f"lam applies to aggregator 'laplace', not {self.aggregator!r}; use gnmax_sigma")
        if self.gnmax_sigma is not None and self.aggregator != "gnmax":
            raise ValueError(f"gnmax_sigma applies to aggregator 'gnmax', not {self.aggregator!r}; use lam")
        for key in ("lr_teacher", "lr_student", "lr_g"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)}")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"{key} must be in [0, 1), got {getattr(self, key)}")

    @property
    def queries_per_iteration(self) -> int:
        return self.student_steps * self.student_batch_size


# ------------------------------------------------------------------------------------ the mechanism


@dataclass(frozen=True)
class Partition:
    """Disjoint teacher partitions: `teacher_of` int64 [N] in 0..k−1; `members` int64 [k, m] record
    indices of each teacher, padded with −1; `sizes` int64 [k]."""

    teacher_of: Tensor
    members: Tensor
    sizes: Tensor


def draw_partition(num_records: int, k: int, generator: torch.Generator) -> Partition:
    """An independent uniform teacher for every record (see the module docstring for why not equal sizes)."""
    return partition_of(torch.randint(0, k, (num_records,), generator=generator), k)


def partition_of(teacher_of: Tensor, k: int) -> Partition:
    """The partition that gives record i to teacher teacher_of[i]."""
    num_records = len(teacher_of)
    sizes = torch.bincount(teacher_of, minlength=k)
    order = torch.argsort(teacher_of, stable=True)  # records grouped by teacher
    slot = torch.arange(num_records) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
    members = torch.full((k, max(1, int(sizes.max()))), -1, dtype=torch.long)
    members[teacher_of[order], slot] = order
    return Partition(teacher_of, members, sizes)


def partition_blocks(train: ImageDataset, partition: Partition, device: torch.device) -> tuple[Tensor, Tensor]:
    """Teacher j's records as row j of zero-padded blocks (teacher j can only ever read row j): uint8
    [k, m, C, H, W] and int64 labels [k, m] on `device`."""
    mask = partition.members >= 0
    part_x = torch.zeros((*mask.shape, *train.images.shape[1:]), dtype=torch.uint8)
    part_y = torch.zeros(mask.shape, dtype=torch.long)
    part_x[mask] = train.images[partition.members[mask]]
    part_y[mask] = train.labels[partition.members[mask]]
    return part_x.to(device), part_y.to(device)


def build_teachers(spec: Any, cfg: Any, device: torch.device) -> TeacherBank | TeacherList:
    """cfg.teachers discriminators (cfg.width, cfg.groups) as one vmapped bank or a loop (cfg.teacher_batching)."""
    nets = [
        Discriminator(channels=spec.channels, num_classes=spec.num_classes, width_c=cfg.width, groups=cfg.groups)
        for _ in range(cfg.teachers)
    ]
    batching = cfg.teacher_batching
    if batching == "auto":
        batching = "loop" if device.type == "cpu" else "vmap"
    bank = TeacherBank(nets) if batching == "vmap" else TeacherList(nets)
    return bank.to(device)


def largest_that_fits(fits: Callable[[int], bool], most: int) -> int:
    """The largest n in 1..most with fits(n), for fits monotone (true, then false) and fits(1) true: bisection."""
    lo, hi = 1, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


class PartitionedTeachers:
    """What the teacher methods (pategan, gpate, datalens, gswgan) share: ONE i.i.d. partition per fit, drawn from a
    generator of its own (seeded by one draw of the run's, so that N draws do not shift the run's stream), its records
    as zero-padded blocks, and the checkpoint's partition on resume (the teachers were trained on it)."""

    name: ClassVar[str]
    config: Any
    spec: Any
    device: torch.device
    iteration: int
    _iteration: Callable[[], None]  # each method's own: one iteration, its training state and its restore
    _training_state: Callable[[], dict[str, Any]]
    _load_training_state: Callable[[dict[str, Any]], None]
    _train: ImageDataset
    partition: Partition

    def _draw_partition(self, train: ImageDataset, k: int, generator: torch.Generator) -> None:
        part_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator).item()))
        self._train = train
        self._use_partition(draw_partition(len(train), k, part_gen))

    def _use_partition(self, partition: Partition) -> None:
        """Teacher j's records, row j of a zero-padded block: teacher j can only ever read row j."""
        self.partition = partition
        self._part_x, self._part_y = partition_blocks(self._train, partition, self.device)
        self._sizes = partition.sizes.to(self.device)

    def _build_teachers(self) -> None:
        self.teachers: TeacherBank | TeacherList = build_teachers(self.spec, self.config, self.device)

    def _check_teachers(self, n: int) -> None:
        if self.config.teachers > n:
            raise BenchError(f"{self.name}: {self.config.teachers} teachers exceed the {n} training records")

    def _run_iterations(self, progress: Progress, iterations: int, label: str) -> None:
        """The teacher methods' loop after `_prepare`: the checkpoint's state on resume, then `_iteration` until
        `iterations` are done, a checkpoint offered after each."""
        if (state := progress.resume()) is not None:
            self._load_training_state(state)
        progress.start(iterations, label)
        progress.advance(self.iteration)
        while self.iteration < iterations:
            self._iteration()
            progress.advance()
            progress.checkpoint(self._training_state)

    def _restore_partition(self, teacher_of: Tensor, k: int) -> None:
        """Resume with the checkpoint's partition, whatever this process drew; one that does not fit is an error."""
        if len(teacher_of) != len(self._train) or int(teacher_of.max()) >= k:
            raise BenchError(f"{self.name}: the checkpoint's partition does not fit this run's data and teachers")
        if not torch.equal(teacher_of, self.partition.teacher_of):
            self._use_partition(partition_of(teacher_of, k))


def vote_counts(logits: Tensor) -> Tensor:
    """Teachers' votes to counts: logits [k, B] (real > 0) -> float [B, 2] = (#fake, #real), rows sum to k."""
    real = (logits > 0).sum(0)
    return torch.stack([logits.shape[0] - real, real], dim=1).float()


def noisy_counts(counts: Tensor, *, aggregator: str, scale: float, generator: torch.Generator) -> Tensor:
    """counts [B, 2] + independent noise on every count: Laplace(scale) = scale·(E1 − E2) with E ~ Exp(1),
    or N(0, scale²) for GNMax. Returns float [B, 2]."""
    if aggregator == "laplace":
        e1 = torch.empty_like(counts).exponential_(generator=generator)
        e2 = torch.empty_like(counts).exponential_(generator=generator)
        return counts + scale * (e1 - e2)
    if aggregator == "gnmax":
        return counts + scale * torch.randn(counts.shape, generator=generator, device=counts.device)
    raise ValueError(f"unknown aggregator {aggregator!r}")


def aggregate(teacher_logits: Tensor, *, aggregator: str, scale: float, generator: torch.Generator) -> Tensor:
    """Noisy-vote labels: logits [k, B] -> int64 [B], argmax of the noisy counts (1 = real). The noise is
    added to the vote COUNTS, never to the labels (one of the public PATE-GAN bugs)."""
    noisy = noisy_counts(vote_counts(teacher_logits), aggregator=aggregator, scale=scale, generator=generator)
    return noisy.argmax(1)


def votes_stage(aggregator: str, scale: float, count: int) -> Stage:
    """What `count` noisy answers at noise `scale` on the counts cost (scale over the sensitivity)."""
    if aggregator == "laplace":
        return Stage(name="votes", mechanism="laplace", noise_multiplier=scale / L1_SENSITIVITY, count=count)
    return Stage(name="votes", mechanism="gaussian", noise_multiplier=scale / L2_SENSITIVITY, count=count)


# ---------------------------------------------------------------------------------------- the method


def noise_and_iterations(cfg: Config, budget: Budget) -> tuple[float, int]:
    """(noise scale on each count, iterations) for the budget; a function of the config only."""
    agg = cfg.aggregator
    per_iteration = cfg.queries_per_iteration
    fixed = cfg.lam if agg == "laplace" else cfg.gnmax_sigma
    if fixed is None:
        q = cfg.iterations * per_iteration
        sens = L1_SENSITIVITY if agg == "laplace" else L2_SENSITIVITY
        s = calibrate(budget.epsilon, lambda s: [votes_stage(agg, s * sens, q)], budget.delta, budget.accountant)
        return s * sens, cfg.iterations
    scale = 1.0 / fixed if agg == "laplace" else fixed

    def fits(iterations: int) -> bool:
        stage = votes_stage(agg, scale, iterations * per_iteration)
        return epsilon([stage], budget.delta, budget.accountant) <= budget.epsilon

    if not fits(1):
        raise BenchError(
            f"pategan: {agg} noise {scale:g} on the counts spends more than ε = {budget.epsilon:g} on one "
            f"iteration's {per_iteration} queries; lower λ / raise σ, or leave it unset to calibrate"
        )
    return scale, largest_that_fits(fits, cfg.iterations)


class PATEGAN(PartitionedTeachers, ConditionalGAN):
    name: ClassVar[str] = "pategan"
    version: ClassVar[int] = 1  # bump when a change of this file changes its results (a new run key)
    Config: ClassVar[type] = Config

    def _build(self) -> None:
        cfg, spec = self.config, self.spec
        g, s = build_pair(spec, latent_dim=cfg.latent_dim, width_c=cfg.width, groups=cfg.groups)
        self.G, self.S = g.to(self.device), s.to(self.device)

    # ------------------------------------------------------------------------------------ calibration

    def noise_and_iterations(self, budget: Budget) -> tuple[float, int]:
        """(noise scale on each count, iterations) for the budget; a function of the config only."""
        return noise_and_iterations(self.config, budget)

    # -------------------------------------------------------------------------------------------- fit

    @classmethod
    def work(cls, config: Any, num_records: int, budget: Budget) -> dict[str, int]:
        """{stage: units of work} of a fit (bench.contract, optional members: `work`)."""
        return {"iterations": noise_and_iterations(config, budget)[1]}

    def fit(
        self, train: ImageDataset, *, budget: Budget, generator: torch.Generator, progress: Progress
    ) -> PrivacyLedger:
        cfg = self.config
        self._check_teachers(len(train))
        self.noise_scale, iterations = self.noise_and_iterations(budget)
        self._prepare(train, generator)
        self._run_iterations(
            progress, iterations, f"pategan {cfg.aggregator} scale={self.noise_scale:.3g} k={cfg.teachers}"
        )
        ledger = PrivacyLedger()
        ledger.add(votes_stage(cfg.aggregator, self.noise_scale, self.queries))
        return ledger

    def _prepare(self, train: ImageDataset, generator: torch.Generator) -> None:
        """Networks, the partition (drawn once) and optimizers. The partition has its own generator,
        seeded by one draw, so that how many draws it takes (N) does not shift the run's stream."""
        cfg, dev = self.config, self.device
        with seeded_init(generator):
            self._build()
            self._build_teachers()
        self._draw_partition(train, cfg.teachers, generator)
        self.generator = generator
        self.noise_gen = device_generator(generator, dev)
        betas = (cfg.beta1, cfg.beta2)
        self.opt_t = torch.optim.Adam(self.teachers.parameters(), lr=cfg.lr_teacher, betas=betas)
        self.opt_s = torch.optim.Adam(self.S.parameters(), lr=cfg.lr_student, betas=betas)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr_g, betas=betas)
        self.iteration = self.queries = 0

    def _fakes(self, n: int) -> tuple[Tensor, Tensor]:
        """n generated samples without gradient: float [n, C, H, W], labels int64 [n] ~ U{classes}."""
        y = torch.randint(0, self.spec.num_classes, (n,), generator=self.noise_gen, device=self.device)
        z = torch.randn(n, self.config.latent_dim, generator=self.noise_gen, device=self.device)
        with torch.no_grad():
            return self.G(z, y), y

    def _iteration(self) -> None:
        cfg = self.config
        for _ in range(cfg.teacher_steps):
            self._teacher_step(self.partition)
        for _ in range(cfg.student_steps):
            self._student_step()
        self._generator_step()
        self.iteration += 1

    def _teacher_step(self, partition: Partition) -> None:
        """All k teachers, each on B of its own partition's records (uniform, with replacement) vs B fakes."""
        k, B = self.config.teachers, self.config.batch_size
        if partition is not self.partition:
            raise RuntimeError("the teacher partition must be the one drawn at the start of fit")
        u = torch.rand(k, B, generator=self.noise_gen, device=self.device)  # k·B draws, whatever the sizes
        slot = (u * self._sizes.clamp(min=1).unsqueeze(1)).long()  # [k, B] in 0..size_j−1
        rows = torch.arange(k, device=self.device).unsqueeze(1)
        x_real = to_model_range(self._part_x[rows, slot])  # [k, B, C, H, W], teacher j's records only
        y_real = self._part_y[rows, slot]
        fake, y_fake = self._fakes(B)
        x = torch.cat([x_real, fake.expand(k, *fake.shape)], dim=1)  # [k, 2B, C, H, W]
        y = torch.cat([y_real, y_fake.expand(k, B)], dim=1)
        logits = self.teachers(x, y)  # [k, 2B]
        has_data = (self._sizes > 0).float()  # an empty partition's teacher only sees fakes
        loss = (has_data * F.softplus(-logits[:, :B]).mean(1)).sum() + F.softplus(logits[:, B:]).mean(1).sum()
        self.opt_t.zero_grad(set_to_none=True)
        loss.backward()  # each teacher's gradient is that of its own loss: the sum separates
        self.opt_t.step()

    def _student_step(self) -> None:
        """B_s queries: fakes labelled by the noisy teacher vote; a BCE step of the student on them."""
        cfg = self.config
        fake, y = self._fakes(cfg.student_batch_size)
        with torch.no_grad():
            logits = self.teachers.shared(fake, y)  # [k, B_s]
        label = aggregate(logits, aggregator=cfg.aggregator, scale=self.noise_scale, generator=self.noise_gen)
        self.queries += label.shape[0]  # every noisy answer computed is charged
        loss = F.binary_cross_entropy_with_logits(self.S(fake, y), label.float())
        self.opt_s.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_s.step()

    def _generator_step(self) -> None:
        """The generator against the student only (non-saturating loss)."""
        cfg = self.config
        n, dev = cfg.generator_batch_size, self.device
        y = torch.randint(0, self.spec.num_classes, (n,), generator=self.noise_gen, device=dev)
        z = torch.randn(n, cfg.latent_dim, generator=self.noise_gen, device=dev)
        loss = F.softplus(-self.S(self.G(z, y), y)).mean()
        params = list(self.G.parameters())
        for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):  # the student gets no .grad
            p.grad = g
        self.opt_g.step()

    # ------------------------------------------------------------------------------- checkpointing

    def _training_state(self) -> dict[str, Any]:
        """Everything to resume (teachers and partition included: a training checkpoint, never released)."""
        return {
            "model": self.state_dict(),
            "teachers": self.teachers.state_dict(),
            "teacher_of": self.partition.teacher_of,
            "optimizers": [opt.state_dict() for opt in (self.opt_t, self.opt_s, self.opt_g)],
            "iteration": self.iteration,
            "queries": self.queries,
            "generator": self.generator.get_state(),
            "noise_generator": self.noise_gen.get_state(),
        }

    def _load_training_state(self, state: dict[str, Any]) -> None:
        """Resume: the teachers were trained on the checkpoint's partition, so the fit goes on with it (one
        partition for the whole fit, whatever this process drew)."""
        self._restore_partition(state["teacher_of"], self.config.teachers)
        self.load_state_dict(state["model"])
        self.teachers.load_state_dict(state["teachers"])
        for opt, s in zip((self.opt_t, self.opt_s, self.opt_g), state["optimizers"], strict=True):
            opt.load_state_dict(s)
        self.iteration, self.queries = int(state["iteration"]), int(state["queries"])
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
        """The released networks: generator and student (post-processing of the noisy votes). Never the teachers."""
        return {"generator": self.G.state_dict(), "student": self.S.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.G.load_state_dict(state["generator"])
        self.S.load_state_dict(state["student"])
