"""Sequence-level splits and resampling: tokens of one sequence are dependent, so the sequence
is the unit that is split into train and test and that the bootstrap resamples."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


def group_index(sequence: torch.Tensor) -> tuple[np.ndarray, int]:
    """Each token's group (0..n_groups - 1, in order of first appearance of its sequence)."""
    _, inverse = np.unique(sequence.numpy(), return_inverse=True)
    return inverse.astype(np.int64), int(inverse.max()) + 1 if inverse.size else 0


def held_out_split(groups: np.ndarray, n_groups: int, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean per token: its sequence is held out. At least one sequence on each side."""
    n_test = min(n_groups - 1, max(1, round(test_fraction * n_groups)))
    order = np.random.default_rng(seed).permutation(n_groups)
    held = np.zeros(n_groups, dtype=bool)
    held[order[:n_test]] = True
    return held[groups]


def bootstrap_counts(n_groups: int, n_resamples: int, seed: int) -> np.ndarray:
    """[n_resamples, n_groups]: how often each sequence is drawn in each resample (with replacement)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_resamples).astype(np.float64)


def resampled_rows(groups: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Token indices of one resample: every token of a sequence repeated as often as it was drawn."""
    return np.repeat(np.arange(len(groups)), counts[groups].astype(np.int64))


def percentile_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of resampled estimates (NaN where fewer than two are finite)."""
    finite = values[np.isfinite(values)]
    if finite.size < 2:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(finite, alpha)), float(np.quantile(finite, 1.0 - alpha))


def bootstrap_ci(
    groups: np.ndarray,
    n_groups: int,
    statistic: Callable[[np.ndarray], float],
    estimate: float,
    n_resamples: int,
    seed: int,
) -> tuple[float, float]:
    """CI of ``statistic(token_indices)`` from resamples of the sequences with replacement: the
    resamples' percentile spread recentred on ``estimate`` (for estimators whose resamples are
    biased, as repeated sequences inflate sample canonical correlations)."""
    if n_groups < 2 or n_resamples < 2:
        return float("nan"), float("nan")
    counts = bootstrap_counts(n_groups, n_resamples, seed)
    return recentred_ci(np.array([statistic(resampled_rows(groups, c)) for c in counts]), estimate)


def recentred_ci(values: np.ndarray, estimate: float) -> tuple[float, float]:
    """The percentile spread of resampled ``values`` around their mean, shifted onto ``estimate``."""
    low, high = percentile_ci(values - np.nanmean(values))
    return estimate + low, estimate + high


def half_sample_ci(
    groups: np.ndarray,
    n_groups: int,
    statistic: Callable[[np.ndarray], float],
    estimate: float,
    n_resamples: int,
    seed: int,
) -> tuple[float, float]:
    """CI from half-samples of the sequences drawn without replacement, recentred on ``estimate``.

    For estimators that a sample with repeated points breaks (KSG counts neighbours at distance
    0): a half-sample without replacement has the spread of the full-sample estimate (finite
    population correction 1 - 1/2), and its deviations from the half-sample mean are shifted
    onto ``estimate``, which removes the half-sample's extra small-sample bias.
    """
    if n_groups < 4 or n_resamples < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_resamples):
        chosen = np.zeros(n_groups, dtype=bool)
        chosen[rng.choice(n_groups, n_groups // 2, replace=False)] = True
        values.append(statistic(np.flatnonzero(chosen[groups])))
    return recentred_ci(np.array(values), estimate)
