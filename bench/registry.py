"""Deprecated: the method registry moved to `bench.grid.registry`. This name stays importable for plugins and their
tests (a DeprecationWarning); it IS that module, so anything set on it reaches the registry."""

from __future__ import annotations

import sys
import warnings

from bench.grid import registry as _registry

warnings.warn("bench.registry moved to bench.grid.registry; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _registry
