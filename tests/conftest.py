from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).parent
TINY_PROFILE = str(TESTS / "profiles" / "tiny.toml")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets a session-wide cache folder of its own (domain extractor, reference stats)."""
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "bench-cache"))
    monkeypatch.delenv("BENCH_DATA", raising=False)
    monkeypatch.delenv("BENCH_RESULTS", raising=False)
    monkeypatch.delenv("BENCH_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.getbasetemp() / "torch-home"))  # no cached weights
