"""Who runs a grid's cells: `local` (this process, one after another: local.py) and `ray` (one Ray task a cell, on
the GPUs of one machine or a cluster: ray.py), side by side behind one protocol (base.py)."""

from __future__ import annotations

import math
import re

from bench.errors import BenchError
from bench.grid.executors.base import Executor, wait_for_busy
from bench.grid.executors.local import LocalExecutor

EXECUTORS = ("local", "ray")

__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "make_executor", "wait_for_busy"]


def make_executor(
    kind: str,
    *,
    ray_address: str | None = None,
    gpus_per_run: float | None = None,
    cpus_per_run: int = 1,
    device: str = "auto",
) -> Executor:
    """The executor the command-line options ask for (checked here: a bad option fails before anything runs)."""
    if kind not in EXECUTORS:
        raise BenchError(f"--executor must be one of {', '.join(EXECUTORS)}, got {kind!r}")
    if kind == "local":
        for given, option in ((ray_address, "--ray-address"), (gpus_per_run, "--gpus-per-run")):
            if given is not None:
                raise BenchError(f"{option} needs --executor ray")
        if cpus_per_run != 1:
            raise BenchError("--cpus-per-run needs --executor ray")
        return LocalExecutor()
    if cpus_per_run < 1:
        raise BenchError(f"--cpus-per-run must be an integer ≥ 1, got {cpus_per_run}")
    if gpus_per_run is not None and (
        not math.isfinite(gpus_per_run) or gpus_per_run < 0 or (gpus_per_run > 1 and not gpus_per_run.is_integer())
    ):
        raise BenchError(f"--gpus-per-run must be a fraction in [0, 1] or a whole number, got {gpus_per_run:g}")
    if not re.fullmatch(r"auto|cpu|cuda", device):
        raise BenchError(f"with --executor ray, --device is auto, cpu or cuda (Ray assigns the GPU), got {device!r}")
    if device == "cpu" and gpus_per_run:
        raise BenchError("--device cpu with --gpus-per-run > 0: the GPUs would be reserved and left idle")
    if device == "cuda" and gpus_per_run == 0:
        raise BenchError("--device cuda with --gpus-per-run 0: a task sees no GPU unless it reserves one")
    from bench.grid.executors.ray import RayExecutor, require_ray

    require_ray()
    return RayExecutor(address=ray_address, gpus_per_run=gpus_per_run, cpus_per_run=cpus_per_run, device=device)
