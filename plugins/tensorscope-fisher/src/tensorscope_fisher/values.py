"""Numbers as the result schema stores them: JSON has no infinities, so non-finite values become null."""

from __future__ import annotations

import math


def finite_or_none(x: float) -> float | None:
    """``x`` when finite, else None (an infinite cond, an undefined ratio, a log-det of a singular matrix)."""
    return x if math.isfinite(x) else None
