"""Keep freed memory for reuse: glibc's malloc settings for a process that trains on the CPU.

By default glibc serves every allocation above a dynamic threshold (128 KiB, rising to at most 32 MiB) with a
fresh `mmap` and returns it to the system on `free`, and trims the heap's top above 128 KiB. A DP-SGD step
allocates tens of megabytes of per-example gradients ([B, *param.shape] for every layer) and frees them
again every step, so each step first touches every page of them anew: page faults that zero memory, charged
to the step. PyTorch's CPU tensors come from malloc, so raising both thresholds keeps those pages in the
process and the next step reuses them.

Measured (DP-GAN's smoke discriminator, batch 128, 1 torch thread, 2-core CPU): a DP step took 11,605 minor
page faults with glibc's defaults and 4 with these settings (108 against 76 ms of thread time); in
benchmarks/bench_gan.py, side by side in one run, the DP step was 0.73× of the non-private step of the same
network with `--malloc default` and 0.83× with `--malloc keep` (min over rounds). The cost is memory: up to
`KEEP_BYTES` of freed memory stays in the process. PyTorch's own CPU performance guide recommends a caching
allocator (jemalloc, tcmalloc) through LD_PRELOAD for the same reason; this needs no extra library.

`keep_freed_memory()` is called by the `bench` command (every subcommand, so that `--estimate` measures what a
run gets), by `bench.grid.run_grid` (a grid run from a notebook) and by each Ray task before any training, and by the
benchmarks (so that their ratios are those a run gets). It does nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
from typing import Any

KEEP_BYTES = 1 << 30  # allocations below this come from the heap; this much freed memory may stay in the process
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def _glibc_function(name: str) -> Any:
    """glibc's function `name` from the running process's C library, or None on another C library (or a glibc
    without it)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to KEEP_BYTES (once per process). True when they were set; False
    on another C library (nothing changes)."""
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


def freed_heap_bytes() -> int:
    """Bytes this process has freed and malloc keeps for reuse (glibc's mallinfo2().fordblks, every arena): memory
    that the kernel's MemAvailable does not count but the next allocations get first. 0 where unknown (another C
    library, glibc before 2.33)."""
    mallinfo2 = _glibc_function("mallinfo2")
    if mallinfo2 is None:
        return 0
    mallinfo2.argtypes, mallinfo2.restype = [], _MallInfo2
    return int(mallinfo2().fordblks)
