"""Statistics helpers shared by plugins (on scipy; no hand-written versions of what it provides)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from scipy import stats

N_RESAMPLES = 1000


def bootstrap_ratio_ci(numerators: Sequence[float] | npt.ArrayLike, denominators: Sequence[float] | npt.ArrayLike,
                       *, seed: int,
                       level: float = 0.95, n_resamples: int = N_RESAMPLES) -> tuple[float, float]:
    """Percentile bootstrap CI of sum(num)/sum(den), resampling examples (pairs) with a seed.

    Used for token-weighted means over sequences (e.g. loss per token): the example,
    not the token, is the independent unit. Returns (nan, nan) below two examples.
    """
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if len(num) < 2:
        return float("nan"), float("nan")

    def ratio(n: np.ndarray, d: np.ndarray, axis: int = -1) -> np.ndarray:
        return n.sum(axis=axis) / d.sum(axis=axis)

    res = stats.bootstrap((num, den), ratio, paired=True, vectorized=True, confidence_level=level,
                          n_resamples=n_resamples, method="percentile", random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)
