"""Argument checks every part of bench.privacy shares."""

from __future__ import annotations

import math
import numbers

from bench.errors import BenchError


def check_delta(delta: float) -> float:
    """Return δ as a float if 0 < δ < 1, else raise BenchError."""
    if not _is_real(delta) or not 0.0 < float(delta) < 1.0:
        raise BenchError(f"δ must be a number in (0, 1), got {delta!r}")
    return float(delta)


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and not math.isnan(x)


def _check_num_records(num_records: int) -> None:
    if isinstance(num_records, bool) or not isinstance(num_records, numbers.Integral) or num_records < 1:
        raise BenchError(f"the number of training records must be an integer >= 1, got {num_records!r}")
