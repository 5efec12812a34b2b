"""One call from a method's DP-SGD settings to a running engine: the rate, the step count, σ calibrated to the
budget, the noise generator and the engine (opacus' `make_private_with_epsilon` is the model).

    q     = B / N                          (poisson_rate: B > N is a one-line error)
    steps = round(epochs / (q · m)) · m    (steps_for; m = steps_multiple, e.g. DP-GAN's discriminator steps
                                            per generator step; at least m)
    σ     = calibrate_sigma(ε, q, steps, δ, accountant)   the smallest σ whose ε ≤ the target
    engine = DPSGD(model, optimizer, σ, C, q, N, noise generator, mode, physical batch, autocast)

`plan_dpsgd` returns (q, steps, σ) for a method that composes several stages or derives its own noise from σ
(DP-SAD, DP-SAD-e2e); `make_dpsgd` also builds the engine. Neither draws from the run's generator except
through `device_generator` (one draw, on an accelerator only), so a method's random stream is what it was when
it wired these steps by hand.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bench.contract import device_generator
from bench.errors import BenchError
from bench.privacy.budget import Budget
from bench.privacy.calibration import calibrate_sigma
from bench.privacy.dpsgd import DPSGD


def poisson_rate(name: str, batch_size: int, num_records: int) -> float:
    """The Poisson sampling rate q = B/N of an expected batch size (a one-line error when B > N)."""
    if batch_size > num_records:
        raise BenchError(f"{name} {batch_size} exceeds the {num_records} training records")
    return batch_size / num_records


def steps_for(epochs: float, q: float, multiple: int = 1) -> int:
    """DP-SGD steps for `epochs` expected passes at rate q: round(epochs / (q · multiple)) · multiple, at least
    `multiple` (a whole number of `multiple`-step rounds)."""
    return max(1, round(epochs / (q * multiple))) * multiple


@dataclass(frozen=True)
class DPSGDPlan:
    """What a DP-SGD stage will run: its Poisson rate, its noisy steps and the σ that meets the budget."""

    sample_rate: float
    steps: int
    sigma: float

    def astuple(self) -> tuple[float, int, float]:
        """(q, steps, σ)."""
        return self.sample_rate, self.steps, self.sigma


def plan_dpsgd(
    name: str, *, budget: Budget, batch_size: int, epochs: float, num_records: int, steps_multiple: int = 1
) -> DPSGDPlan:
    """q, steps and σ of one DP-SGD stage spending all of `budget`; `name` prefixes the error of a batch too large
    (e.g. "dpdm: batch_size")."""
    q = poisson_rate(name, batch_size, num_records)
    steps = steps_for(epochs, q, steps_multiple)
    sigma = calibrate_sigma(budget.epsilon, sample_rate=q, steps=steps, delta=budget.delta,
                            accountant=budget.accountant)  # fmt: skip
    return DPSGDPlan(sample_rate=q, steps=steps, sigma=sigma)


@dataclass(frozen=True)
class PrivateTraining:
    """`make_dpsgd`'s result: the engine, its plan and the generator its noise is drawn from."""

    engine: DPSGD
    plan: DPSGDPlan
    noise_generator: torch.Generator


def make_dpsgd(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    name: str,
    per_example_loss: Callable[..., Tensor],
    budget: Budget,
    batch_size: int,
    epochs: float,
    num_records: int,
    max_grad_norm: float,
    generator: torch.Generator,
    device: torch.device,
    steps_multiple: int = 1,
    **engine: Any,
) -> PrivateTraining:
    """The DP-SGD set-up of a method in one call: `plan_dpsgd`, then the noise generator on `device` (seeded from
    the run's `generator`), then the engine with σ, C, q and N. `engine` passes the engine's own options through
    (mode, max_physical_batch_size, autocast_dtype)."""
    plan = plan_dpsgd(name, budget=budget, batch_size=batch_size, epochs=epochs, num_records=num_records,
                      steps_multiple=steps_multiple)  # fmt: skip
    noise_gen = device_generator(generator, device)  # Poisson batches come from the run's CPU generator
    dp = DPSGD(model, optimizer, per_example_loss=per_example_loss, noise_multiplier=plan.sigma,
               max_grad_norm=max_grad_norm, sample_rate=plan.sample_rate, num_records=num_records,
               generator=noise_gen, **engine)  # fmt: skip
    return PrivateTraining(engine=dp, plan=plan, noise_generator=noise_gen)
