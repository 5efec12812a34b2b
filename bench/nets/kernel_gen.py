"""What the mean-embedding methods share (DP-MERF, DP-HP, DP-NTK): their conditional generators, the post-processing
training loop that fits a generator to released noisy embeddings, and sampling.

The generators are ParkLabML/DP-MERF@e4ae72dfba3941dec2ae3ffa7025afedeeb858cd:code_balanced/models_gen.py
(ConvCondGen, FCCondGen), which ParkLabML/DP-HP@e9aec76845f8a127ba0a7a25614641878199cae7:dp_mehp/all_aux_files.py
copies. BatchNorm is fine here: the generators never see private data (they fit released embeddings only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.contract import DataSpec, Progress
from bench.errors import BenchError
from bench.nets import BuiltOnce
from bench.privacy import N_DIVIDES_THE_RELEASE, Budget, PrivacyLedger, Stage, calibrate


class ConvCondGen(nn.Module):
    """[z, onehot(y)] → Linear(d_code + classes, hidden) → BatchNorm → ReLU → Linear(hidden, c1·H/4·W/4) →
    BatchNorm (no ReLU, as the reference) → (c1, H/4, W/4) → bilinear ×2 → Conv(c1, c2, k) → ReLU → bilinear ×2 →
    Conv(c2, C, k) → sigmoid: an image in [0, 1] (the reference's 7×7 start on 28×28, generalised to H/4 × W/4)."""

    def __init__(
        self, spec: DataSpec, *, d_code: int, hidden: int, channels: Sequence[int], kernel_size: int, owner: str
    ) -> None:
        super().__init__()
        c1, c2 = channels
        if spec.height % 4 or spec.width % 4:
            raise BenchError(f"{owner}'s generator needs sides divisible by 4, got {spec.height}×{spec.width}")
        self.h0, self.w0, self.c1, self.num_classes = spec.height // 4, spec.width // 4, c1, spec.num_classes
        self.fc1 = nn.Linear(d_code + spec.num_classes, hidden)
        self.bn1 = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, c1 * self.h0 * self.w0)
        self.bn2 = nn.BatchNorm1d(c1 * self.h0 * self.w0)
        pad = kernel_size // 2
        self.conv1 = nn.Conv2d(c1, c2, kernel_size, padding=pad)
        self.conv2 = nn.Conv2d(c2, spec.channels, kernel_size, padding=pad)

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        """z float [B, d_code], labels int64 [B] → float [B, C, H, W] in [0, 1]."""
        x = torch.cat([z, F.one_hot(labels, self.num_classes).float()], dim=1)
        x = self.bn2(self.fc2(F.relu(self.bn1(self.fc1(x)))))
        x = x.view(-1, self.c1, self.h0, self.w0)
        x = F.relu(self.conv1(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)))
        x = self.conv2(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True))
        return torch.sigmoid(x)  # UpsamplingBilinear2d is bilinear with align_corners=True


class FCCondGen(nn.Module):
    """[z, onehot(y)] → (Linear → BatchNorm → ReLU) per hidden width → Linear(·, C·H·W) → sigmoid."""

    def __init__(self, spec: DataSpec, *, d_code: int, hidden: Sequence[int]) -> None:
        super().__init__()
        self.shape = (spec.channels, spec.height, spec.width)
        self.num_classes = spec.num_classes
        layers: list[nn.Module] = []
        width = d_code + spec.num_classes
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU()]
            width = h
        self.net = nn.Sequential(*layers, nn.Linear(width, spec.channels * spec.height * spec.width), nn.Sigmoid())

    def forward(self, z: Tensor, labels: Tensor) -> Tensor:
        """z float [B, d_code], labels int64 [B] → float [B, C, H, W] in [0, 1]."""
        return self.net(torch.cat([z, F.one_hot(labels, self.num_classes).float()], dim=1)).view(-1, *self.shape)


class GeneratorTraining:
    """Adam with a StepLR decay once per epoch on a loss against released embeddings (post-processing), with
    crash-safe checkpoints through the harness's Progress: the references' training loop."""

    def __init__(self, gen: nn.Module, *, lr: float, lr_decay: float, owner: str) -> None:
        self.gen, self.owner = gen, owner
        self.optimizer = torch.optim.Adam(gen.parameters(), lr=lr)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=lr_decay)

    def resume(self, state: dict[str, Any]) -> int:
        """Restore the optimiser and the schedule from a checkpoint; returns its step."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return int(state["step"])

    def run(
        self,
        *,
        step: int,
        total: int,
        loss_at: Callable[[int], Tensor],
        progress: Progress,
        state: Callable[[], dict[str, Any]],
        steps_per_epoch: int | None = None,
        decay_after: Callable[[int], bool] | None = None,
    ) -> None:
        """Steps `step`..`total` − 1 of `loss_at(step)`; a checkpoint is `state()` (the method's model, its
        releases and the run's generator state) plus the optimiser, the schedule and the step. The schedule
        decays after every `steps_per_epoch` steps, or after each step index k with `decay_after(k)`."""
        if (steps_per_epoch is None) == (decay_after is None):
            raise ValueError("give one of steps_per_epoch and decay_after")
        if decay_after is None:
            assert steps_per_epoch is not None
            every = steps_per_epoch
            decay_after = lambda k: (k + 1) % every == 0  # noqa: E731
        self.gen.train()
        while step < total:
            loss = loss_at(step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if decay_after(step):
                self.scheduler.step()
            step += 1
            if not torch.isfinite(loss):
                raise BenchError(f"{self.owner}: the loss is not finite at step {step} (lower lr?)")
            progress.advance()
            progress.checkpoint(
                lambda step=step: (
                    state()  # type: ignore[misc]  # the default binds this step's value
                    | {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "step": step}
                )
            )


@torch.no_grad()
def sample_images(
    gen: nn.Module, labels: Tensor | None, *, spec: DataSpec, d_code: int, generator: torch.Generator,
    device: torch.device, owner: str, batch_size: int = 1000,
) -> Tensor:  # fmt: skip
    """uint8 [n, C, H, W] for int64 `labels` [n] from a conditional generator in evaluation mode (BatchNorm's
    running statistics), z ~ N(0, I) from the CPU `generator`; pixels round(255·x)."""
    if labels is None:
        raise BenchError(f"{owner} is class-conditional: it needs labels")
    gen.eval()
    out = [torch.zeros((0, spec.channels, spec.height, spec.width), dtype=torch.uint8)]
    for y in labels.split(batch_size):
        z = torch.randn(len(y), d_code, generator=generator).to(device)
        out.append((gen(z, y.to(device)) * 255.0).round().to(torch.uint8).cpu())
    return torch.cat(out)


def flat_pixels(images: Tensor) -> Tensor:
    """uint8 [N, C, H, W] → float [N, C·H·W] in [0, 1] (torchvision's ToTensor, flattened)."""
    return images.reshape(len(images), -1).float() / 255.0


class OneNoisyEmbedding(BuiltOnce):
    """What DP-MERF and DP-NTK share: ONE Gaussian release of a class-conditional sum embedding whose records each
    have norm 1 (L2 sensitivity 1 under add/remove), divided by n (public); a generator fitted to it alone
    (post-processing) and sampled in evaluation mode. Subclasses set `name`, `SENSITIVITY` (the card's words),
    `self.gen` and a config with `noise_multiplier`, `adjacency` and `d_code`."""

    conditional: ClassVar[bool] = True
    guarantee: ClassVar[str] = "end-to-end"
    needs_public_data: ClassVar[bool] = False
    name: ClassVar[str]
    SENSITIVITY: ClassVar[str]
    config: Any
    spec: DataSpec
    gen: nn.Module

    def released_model(self) -> nn.Module:
        return self.gen

    @classmethod
    def release_stage(cls, sigma: float) -> Stage:
        """The one release: the sum embedding (L2 sensitivity 1 under add/remove) plus N(0, σ²I)."""
        return Stage(name="embedding", mechanism="gaussian", noise_multiplier=sigma, count=1,
                     sensitivity=cls.SENSITIVITY)  # fmt: skip

    def noise_multiplier(self, budget: Budget) -> float:
        """σ of the one Gaussian release on the sum (sensitivity 1): the config's, or calibrated to the budget
        (times 2 with adjacency "replace-one", as the references' 2σ/n on the mean)."""
        if self.config.noise_multiplier is not None:
            sigma = self.config.noise_multiplier
        elif budget.is_unlimited:
            raise BenchError(f"{self.name}: an unlimited budget needs an explicit noise_multiplier")
        else:
            sigma = calibrate(budget.epsilon, lambda s: [self.release_stage(s)], budget.delta, budget.accountant)
        return 2.0 * sigma if self.config.adjacency == "replace-one" else sigma

    def release_ledger(self, sigma: float) -> PrivacyLedger:
        """The ledger of the fit: the one release, and n public (it divides the release)."""
        ledger = PrivacyLedger()
        ledger.add(self.release_stage(sigma))
        ledger.assume(N_DIVIDES_THE_RELEASE)
        return ledger

    def sample(self, n: int, *, labels: Tensor | None, generator: torch.Generator) -> Tensor:
        """uint8 [n, C, H, W] for int64 `labels` [n], from the generator in evaluation mode."""
        return sample_images(self.gen, labels, spec=self.spec, d_code=self.config.d_code, generator=generator,
                             device=self.device, owner=self.name)  # fmt: skip
