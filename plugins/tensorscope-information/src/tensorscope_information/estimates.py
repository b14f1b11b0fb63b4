"""The three mutual-information estimates of one layer (or layer pair), each with its CI over sequences."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .gaussian import gaussian_mi
from .ksg import ksg_mi
from .labels import entropy_nats
from .probe import fit_probe, token_nll
from .resampling import bootstrap_ci, bootstrap_counts, group_index, half_sample_ci, percentile_ci


@dataclass
class Estimate:
    value: float
    ci_low: float
    ci_high: float


@dataclass
class ProbeBound:
    """I(h; Y) >= H(Y) - CE_test(probe), clipped at 0, and its two terms (nats)."""

    information: Estimate
    entropy: float
    cross_entropy: float


def probe_bound(
    x: torch.Tensor,
    classes: torch.Tensor,
    n_classes: int,
    held_out: np.ndarray,
    groups: np.ndarray,
    l2: float,
    max_iter: int,
    n_resamples: int,
    seed: int,
) -> ProbeBound:
    """Barber-Agakov bound with a probe fitted on the training sequences and scored on the held-out ones.

    H(Y) is the plug-in entropy of the held-out labels, so a probe that only knows the label
    marginal scores CE_test >= H(Y) (Gibbs) and the bound is 0. The CI resamples held-out
    sequences with the probe held fixed: it covers the test sample, not the probe's training.
    """
    test = torch.from_numpy(held_out)
    probe = fit_probe(x[~test], classes[~test], n_classes, l2, max_iter)
    nll = token_nll(probe, x[test], classes[test]).numpy()
    local, m = group_index(torch.from_numpy(groups[held_out]))
    nll_sum = np.bincount(local, weights=nll, minlength=m)
    count = np.bincount(local, minlength=m).astype(np.float64)
    label_counts = np.zeros((m, n_classes))
    np.add.at(label_counts, (local, classes[test].numpy()), 1.0)
    entropy = float(entropy_nats(label_counts.sum(0)))
    cross_entropy = float(nll_sum.sum() / count.sum())
    low = high = float("nan")
    if m >= 2 and n_resamples >= 2:
        draws = bootstrap_counts(m, n_resamples, seed)
        resampled = np.maximum(0.0, entropy_nats(draws @ label_counts) - (draws @ nll_sum) / (draws @ count))
        low, high = percentile_ci(resampled)
    return ProbeBound(Estimate(max(0.0, entropy - cross_entropy), low, high), entropy, cross_entropy)


def gaussian_estimate(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, n_groups: int, n_resamples: int, seed: int
) -> Estimate:
    """Gaussian MI of whitened principal components with a bootstrap CI over sequences.

    The principal axes are the full sample's; the shrinkage is refitted per resample. A
    resample repeats sequences, which inflates sample canonical correlations, so its
    percentiles sit above the estimate: the interval is their spread recentred on the estimate.
    """
    value = gaussian_mi(x, y)
    low, high = bootstrap_ci(groups, n_groups, lambda rows: gaussian_mi(x[rows], y[rows]), value, n_resamples, seed)
    return Estimate(value, low, high)


def ksg_estimate(
    x: np.ndarray, y: np.ndarray, groups: np.ndarray, n_groups: int, k: int, n_resamples: int, seed: int
) -> Estimate:
    """KSG estimate with a half-sampling CI over sequences (a bootstrap with replacement repeats
    points, which KSG reads as infinitely close neighbours)."""

    def statistic(rows: np.ndarray) -> float:
        return ksg_mi(x[rows], y[rows], k, seed) if len(rows) > k else float("nan")

    value = ksg_mi(x, y, k, seed)
    low, high = half_sample_ci(groups, n_groups, statistic, value, n_resamples, seed)
    return Estimate(value, low, high)
