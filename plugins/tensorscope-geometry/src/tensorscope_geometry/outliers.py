"""Pure maths of the sample-outlier score: pooling, k-th neighbour distances, robust z-scores.

The metric calls these; the tests feed hand-made points through the same functions and the metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

Pooling = Literal["mean", "last"]
Distance = Literal["euclidean", "cosine"]

#: 1 / Phi^-1(3/4): MAD * this estimates the standard deviation of a normal sample
MAD_SCALE = 1.4826
#: sqrt(pi / 2): mean absolute deviation * this estimates it (used where the MAD is 0)
MEAN_AD_SCALE = 1.253314


def pool(acts: torch.Tensor, mask: torch.Tensor, pooling: Pooling, include_first: bool) -> torch.Tensor:
    """[batch, d] float64 per sequence: the mean over its real tokens (from position 1 unless
    ``include_first``; a one-token sequence keeps its token) or its last real token."""
    real = mask.bool()
    x = acts.double()
    if pooling == "last":
        last = real.long().sum(dim=1).clamp_min(1) - 1
        return x[torch.arange(x.shape[0]), last]
    weights = real.clone()
    if not include_first:
        weights[:, 0] &= real.sum(dim=1) == 1
    w = weights.double()
    return (x * w.unsqueeze(-1)).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp_min(1)


def kth_neighbour_distance(points: np.ndarray, k: int, metric: Distance) -> np.ndarray:
    """[n] distance of each point to its k-th nearest other point (sklearn, exact brute force;
    cosine: 1 - cos). A point is never its own neighbour; duplicates are at distance 0."""
    search = NearestNeighbors(n_neighbors=k, metric=metric, algorithm="brute").fit(points)
    distances, _ = search.kneighbors()
    return distances[:, k - 1]


@dataclass(frozen=True)
class RobustZ:
    z: np.ndarray
    median: float
    mad: float
    scale: float
    estimator: str  # what ``scale`` is: "1.4826 MAD", "1.2533 mean |x - median|" or "none"


def robust_z(x: np.ndarray) -> RobustZ:
    """(x - median) / (1.4826 MAD). Where more than half the values tie at the median the MAD is 0:
    the scale is then 1.253314 x the mean absolute deviation from the median (Iglewicz and Hoaglin's
    fallback); where every value is the median, z = 0."""
    median = float(np.median(x))
    deviation = np.abs(x - median)
    mad = float(np.median(deviation))
    if mad > 0:
        scale, estimator = MAD_SCALE * mad, "1.4826 MAD"
    elif deviation.mean() > 0:
        scale, estimator = MEAN_AD_SCALE * float(deviation.mean()), "1.2533 mean |x - median| (MAD is 0)"
    else:
        return RobustZ(np.zeros_like(x), median, mad, 0.0, "none (every value is the median)")
    return RobustZ((x - median) / scale, median, mad, scale, estimator)
