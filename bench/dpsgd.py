"""Deprecated: the DP-SGD engine moved to `bench.privacy.dpsgd`. This name stays importable for plugins (a
DeprecationWarning); it IS that module, so anything set on it reaches the engine."""

from __future__ import annotations

import sys
import warnings

from bench.privacy import dpsgd as _dpsgd

warnings.warn("bench.dpsgd moved to bench.privacy.dpsgd; import it from there", DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _dpsgd
