"""bench.allocator: after keep_freed_memory() a DP-SGD step reuses the pages of the last step's per-example
gradients instead of faulting fresh ones in (the measured cause of most of DP-GAN's DP-step overhead)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from bench.allocator import keep_freed_memory

# Minor page faults a step of DP-SGD ("folded") on DP-GAN's smoke discriminator (batch 128), in a fresh process.
_PROBE = """
import resource, sys, torch
import torch.nn.functional as F
from bench.allocator import keep_freed_memory
from bench.nets.gan import Discriminator
from bench.privacy.dpsgd import DPSGD
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.manual_seed(0)
torch.set_num_threads(1)
d = Discriminator(channels=1, num_classes=10, width_c=32, groups=8)
def loss(model, x, y):
    return F.softplus(-model(x.unsqueeze(0), y.unsqueeze(0))).sum()
dp = DPSGD(d, torch.optim.Adam(d.parameters()), per_example_loss=loss, noise_multiplier=1.0, max_grad_norm=1.0,
           sample_rate=0.01, num_records=12800, generator=torch.Generator().manual_seed(0), mode="folded")
x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))
for _ in range(2):
    dp.step(x, y)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    dp.step(x, y)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


def _faults_per_step(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@glibc
def test_dp_step_reuses_freed_pages() -> None:
    kept, default = _faults_per_step("keep"), _faults_per_step("default")
    assert default > 1000, f"glibc's defaults should fault a step's gradients in anew ({default} faults a step)"
    assert kept < default / 4, f"with keep_freed_memory() a step should reuse them ({kept} against {default})"


@glibc
def test_set_once_per_process() -> None:
    assert keep_freed_memory() is keep_freed_memory() is True


_FREED = """
import sys, torch
from bench.allocator import freed_heap_bytes, keep_freed_memory
assert keep_freed_memory()
before = freed_heap_bytes()
x = torch.zeros(25_000_000)  # 100 MB, below the kept threshold: from the heap
x.add_(1)
del x
print(before, freed_heap_bytes())
"""


@glibc
def test_memory_this_process_freed_and_keeps_is_counted() -> None:
    """What bench.memory adds to MemAvailable: a freed 100 MB tensor stays in the process, reusable, and is counted."""
    out = subprocess.run([sys.executable, "-c", _FREED], capture_output=True, text=True, check=True)
    before, after = map(int, out.stdout.split())
    assert after - before >= 100_000_000, (before, after)
