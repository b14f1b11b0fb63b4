"""Kraskov-Stoegbauer-Grassberger (KSG, algorithm 1) mutual information of two vectors.

I = psi(k) + psi(N) - < psi(n_x + 1) + psi(n_y + 1) >, where eps_i is the max-norm distance of
point i to its k-th neighbour in the joint space and n_x (n_y) counts the other points closer
than eps_i in X (Y) alone. Written here because scikit-learn's estimator takes a 1-D target
only; it is tested against scikit-learn's on 1-D pairs and against Gaussian closed forms.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree
from scipy.special import digamma

#: relative size of the jitter that breaks ties between repeated points (as scikit-learn adds)
JITTER = 1e-10


def ksg_mi(x: np.ndarray, y: np.ndarray, k: int = 3, seed: int = 0) -> float:
    """KSG estimate (nats) from rows ``x`` [n, p] and ``y`` [n, q]; needs n > k."""
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    n = len(x)
    if n <= k:
        raise ValueError(f"KSG with k={k} needs more than {k} points, got {n}")
    rng = np.random.default_rng(seed)
    x = x + JITTER * np.maximum(1.0, np.abs(x).mean(0)) * rng.standard_normal(x.shape)
    y = y + JITTER * np.maximum(1.0, np.abs(y).mean(0)) * rng.standard_normal(y.shape)
    distances, _ = cKDTree(np.hstack([x, y])).query(np.hstack([x, y]), k=k + 1, p=np.inf)
    radius = np.nextafter(distances[:, -1], 0)  # strictly closer than the k-th neighbour
    n_x = cKDTree(x).query_ball_point(x, radius, p=np.inf, return_length=True) - 1
    n_y = cKDTree(y).query_ball_point(y, radius, p=np.inf, return_length=True) - 1
    return float(digamma(k) + digamma(n) - np.mean(digamma(n_x + 1) + digamma(n_y + 1)))
