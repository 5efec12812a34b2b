"""Deprecated: planning and running a grid moved to the `bench.grid` package (planning, runner, executors, run).
This name stays importable for scripts written against it (a DeprecationWarning): its public names are those of
`bench.grid` and `bench.grid.runner`."""

from __future__ import annotations

import warnings
from typing import Any

from bench import config as _config
from bench import grid as _grid
from bench.grid import runner as _runner

warnings.warn("bench.runner moved to the bench.grid package; import from bench.grid", DeprecationWarning, stacklevel=2)


def __getattr__(name: str) -> Any:
    for module in (_grid, _runner, _config):  # parse_epsilons and the like lived here too
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'bench.runner' has no attribute {name!r}")
