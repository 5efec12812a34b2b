"""The harness's cache folder (decoded datasets, trained feature extractors, real-side statistics, downstream
records): `$BENCH_CACHE`, else ~/.cache/bench. Its own module so that every module can import it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The harness's cache folder: `$BENCH_CACHE`, else ~/.cache/bench."""
    env = os.environ.get("BENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bench"
