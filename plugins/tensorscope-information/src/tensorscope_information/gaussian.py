"""Gaussian (CCA) mutual information between two representations.

I_G(X; Y) = -1/2 sum_i ln(1 - rho_i^2) over the canonical correlations of X and Y, which is
the mutual information of jointly Gaussian variables with their covariance (and a lower
bound on nothing in general: it sees linear dependence only). Each side is reduced to its r
leading principal components and whitened; the joint covariance of the 2r whitened columns is
shrunk with Ledoit-Wolf (towards the identity, so the cross-correlations shrink towards 0),
and I_G = 1/2 (ln det S_xx + ln det S_yy - ln det S), which equals the sum over rho_i.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.covariance import LedoitWolf

#: principal components whose variance is below this fraction of the largest are dropped (rank deficiency)
RELATIVE_VARIANCE_FLOOR = 1e-10


@dataclass
class Whitener:
    """Projection onto the leading principal components, scaled to unit variance."""

    mean: np.ndarray
    basis: np.ndarray  # [d, r], columns divided by their component's standard deviation

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray((x - self.mean) @ self.basis)


def fit_whitener(x: np.ndarray, r: int) -> Whitener:
    """PCA of ``x`` [n, d] (float64) to at most ``r`` components of non-negligible variance."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(0)
    centred = x - mean
    variances, vectors = np.linalg.eigh(centred.T @ centred / len(x))
    order = np.argsort(variances)[::-1][:r]
    variances, vectors = variances[order], vectors[:, order]
    keep = variances > RELATIVE_VARIANCE_FLOOR * max(float(variances[0]), np.finfo(float).tiny)
    return Whitener(mean, vectors[:, keep] / np.sqrt(variances[keep]))


def usable_dims(n: int, d: int, r: int, min_tokens_per_dim: int) -> int:
    """r reduced so that the 2r-dimensional joint covariance has ``min_tokens_per_dim`` tokens per
    dimension (n <= r would make it singular and the MI infinite); 0 means: refuse."""
    return max(0, min(r, d, n // (2 * min_tokens_per_dim)))


def gaussian_mi(x: np.ndarray, y: np.ndarray) -> float:
    """I_G (nats) of already reduced columns ``x`` [n, p] and ``y`` [n, q], Ledoit-Wolf shrunk."""
    p = x.shape[1]
    joint = LedoitWolf().fit(np.hstack([x, y])).covariance_
    logdet = [np.linalg.slogdet(m)[1] for m in (joint[:p, :p], joint[p:, p:], joint)]
    return float(max(0.0, 0.5 * (logdet[0] + logdet[1] - logdet[2])))
