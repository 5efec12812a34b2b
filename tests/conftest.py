from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner, Result

from bench import data
from bench.cli import app
from bench.contract import ImageDataset, NullProgress
from bench.grid import registry

TESTS = Path(__file__).parent
TINY_PROFILE = str(TESTS / "profiles" / "tiny.toml")


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """For the whole session (module fixtures and subprocesses too): one cache folder of the session's
    own (domain extractor, reference statistics), no Inception weights, no user data or results folders."""
    base = tmp_path_factory.getbasetemp()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BENCH_CACHE", str(base / "bench-cache"))
        mp.setenv("TORCH_HOME", str(base / "torch-home"))  # no cached torch-fidelity weights
        for var in ("BENCH_DATA", "BENCH_RESULTS", "BENCH_INCEPTION_WEIGHTS"):
            mp.delenv(var, raising=False)
        yield


@pytest.fixture(scope="session")
def train() -> ImageDataset:
    """The procedural 1×16×16 training split (2,000 records, 10 classes)."""
    return data.load("synthetic", "train")


@pytest.fixture(scope="session")
def test_split() -> ImageDataset:
    return data.load("synthetic", "test")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Two torch threads on two shared cores stall when another process competes; one is steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bench(*args: str) -> Result:
    """Run the `bench` CLI in-process (a fresh registry each time, as a new process would have; `--debug`, which
    sets BENCH_DEBUG in this process's environment, does not outlive the call)."""
    registry._cache.clear()
    before = os.environ.get("BENCH_DEBUG")
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        if before is None:
            os.environ.pop("BENCH_DEBUG", None)
        else:
            os.environ["BENCH_DEBUG"] = before


class InterruptAt(NullProgress):
    """A Progress that keeps (a copy of) the state of the n-th checkpoint, as an interrupted run's checkpoint file
    would, or with n = "half" of the first checkpoint at or after half the fit's units; it resumes from `state`
    when given, and counts the units (`done`, of `total`)."""

    def __init__(self, n: int | str, state: dict | None = None) -> None:
        self.n, self.calls, self.saved, self.state = n, 0, None, state
        self.total = self.done = 0

    def start(self, total: int, description: str = "") -> None:
        self.total = total

    def advance(self, n: int = 1) -> None:
        self.done += n

    def resume(self) -> dict | None:
        return self.state

    def checkpoint(self, state_fn) -> None:
        self.calls += 1
        due = self.done >= max(1, self.total // 2) and self.saved is None if self.n == "half" else self.calls == self.n
        if due and self.state is None:
            buffer = io.BytesIO()
            torch.save(state_fn(), buffer)  # a copy, as on disk
            self.saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
