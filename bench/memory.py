"""Does a training step fit in memory? Its activations, measured, against what the device has free.

A network's training step keeps every tensor that autograd saves for the backward pass until that pass has used it.
`step_bytes` counts them with `torch.autograd.graph.saved_tensors_hooks` during one forward pass of a copy of the
network at batch 2 and one at batch 4 (distinct storages, the parameters left out): half the difference is what one
more example adds, so a batch of B needs B times it, plus the parameters with their gradients and optimiser state. The
copy runs on the CPU in training mode with the global random state restored afterwards, so the network to be
trained and its seeded draws are untouched.

`PEAK_OVER_SAVED` turns the saved activations into the step's peak: the backward pass holds activation gradients
and the convolutions' work buffers beside them, and the allocator holds freed blocks. Measured on a 2-core CPU
(torch 2.14.1, glibc malloc with bench.allocator's settings, two Adam steps), DPImageBench's classifiers on 1-channel
images, the process's peak RSS less its RSS before the steps, less the parameters' state, over the activations
counted here: ResNet-110 at 32×32, batch 256, 2.86 GB over 2.16 GB (1.32); WRN-40-4, same, 4.95 over 4.26 (1.16);
ResNeXt-29 at 32×32, batch 64, 6.15 over 4.28 (1.44); ResNeXt-29 at 28×28, batch 256, 21.6 over 13.1 (1.65: 23.5 GB
peak RSS on a 24 GiB machine; at 32×32 and batch 256 the kernel killed the process). 1.7 covers them all; on the
small networks it overstates by up to 45%.

`check_fits` raises a one-line BenchError when a step would need more than `USABLE` (90%) of what the device has
free; on a CPU the alternative is the kernel killing the process, with no message and the grid's remaining cells
not run. Free: on a CPU the kernel's MemAvailable plus what this process has freed and malloc keeps for reuse
(bench.allocator's settings make it large: after one ResNeXt-29 step the process held 21 GB that MemAvailable no
longer counted); on CUDA the free device memory plus what PyTorch's cache holds unused; elsewhere unknown, and
nothing is checked. Not all of it, because the rest is the system's: ResNeXt-29's step at 28×28 is estimated at
21.3 GiB against 21.8 GiB free on this 24 GiB machine, and a process timing it reached 23.9 GB resident.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from bench.allocator import freed_heap_bytes
from bench.errors import BenchError

PEAK_OVER_SAVED = 1.7  # step peak ÷ saved activations: 1.16 to 1.65 measured (module docstring)
STATE_PER_PARAMETER = 4  # weights, gradients and two Adam moments (SGD with momentum: 3; an EMA copy: +1)
USABLE = 0.9  # of the free memory a step may take: the rest is the system's (module docstring)
GIB = 1 << 30


def saved_activation_bytes(model: nn.Module, inputs: Tensor) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass in one forward of `model` on `inputs`,
    the model's own parameters and buffers left out."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs)
    return sum(seen.values())


def step_bytes(model: nn.Module, sample_shape: tuple[int, ...], batch_size: int) -> int:
    """Estimated peak bytes of one training step of `model` at `batch_size` examples of `sample_shape`: the saved
    activations per example (half of batch 4 less batch 2, on a CPU copy of the model; batch norm needs two) × batch
    × PEAK_OVER_SAVED, plus STATE_PER_PARAMETER copies of the parameters."""
    probe = copy.deepcopy(model).cpu().train()
    for p in probe.parameters():
        p.requires_grad_(True)
    dtype = next(probe.parameters()).dtype
    with torch.random.fork_rng(devices=[]):
        two, four = (saved_activation_bytes(probe, torch.zeros(b, *sample_shape, dtype=dtype)) for b in (2, 4))
    per_example = max(four - two, 0) // 2
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    return int(per_example * batch_size * PEAK_OVER_SAVED) + STATE_PER_PARAMETER * parameters


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a new allocation on `device`, or None where it cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 + freed_heap_bytes()
        except OSError:
            return None
    return None


def check_fits(what: str, model: nn.Module, sample_shape: tuple[int, ...], batch_size: int, device: torch.device,
               *, advice: str) -> None:  # fmt: skip
    """BenchError naming `what` and `advice` when a training step of `model` at `batch_size` would need more than
    USABLE of the memory free on `device`."""
    free = available_bytes(device)
    if free is None:
        return
    need = step_bytes(model, sample_shape, batch_size)
    if need > USABLE * free:
        raise BenchError(
            f"{what}: a training step at batch {batch_size} needs about {need / GIB:.1f} GiB and {device.type} has "
            f"{free / GIB:.1f} GiB free (a step may use {USABLE:.0%} of it); {advice}"
        )
