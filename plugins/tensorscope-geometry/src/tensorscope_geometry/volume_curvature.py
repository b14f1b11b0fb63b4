"""Curvature from the growth of ball volumes with radius: the second-order term of log V(r).

On a Riemannian n-manifold the geodesic ball volume is V(r) = w_n r^n (1 - S r^2 / (6 (n + 2)) + O(r^4)),
S the scalar curvature; the reference (``split_geo_estimator.geo_estimator``) turns the residual of
its log-log fit into ``-residual * 6 (d + 2) / r^2``. Here the r^2 term is fitted jointly,

    psi(k) = c + n log r_k + b r_k^2,    kappa = -6 (n + 2) b,

with the log-volume debiased: for N points sampled uniformly, the measure of the ball reaching the
k-th neighbour is Beta(k, N - k), whose log has mean psi(k) - psi(N) (psi the digamma function), not
log k - log N. The constant drops into c. The bias log k - psi(k) ~ 1/(2k) is as large as the
curvature term itself at the radii where kNN data live, so it is removed rather than ignored.

What kappa measures depends on the distance: with geodesic distances it is S. With the ambient
(Euclidean) distances of an embedding, Karp & Pinsky (1989) give, for a submanifold with second
fundamental form alpha and mean curvature vector H, vol(M cap B_r) = w_n r^n (1 + (2|alpha|^2 - |H|^2)
r^2 / (8 (n + 2)) + ...), so kappa = (3/4)(|H|^2 - 2|alpha|^2). For a round n-sphere of radius R that
is 3 n (n - 2) / (4 R^2): 9/(4R^2) on S^3, 0 on S^2 (Archimedes: a chordal cap of S^2 has area
pi c^2 exactly), -3/(4R^2) on a circle. Sampling density that varies over the ball enters the same
r^2 term, so kappa is a curvature of the *measure* as seen by neighbour counts.
"""

from __future__ import annotations

import numpy as np
from scipy.special import digamma


def debiased_log_volume(k: np.ndarray) -> np.ndarray:
    """psi(k): the mean log measure (up to a constant) of the ball reaching the k-th neighbour."""
    return digamma(np.asarray(k, dtype=np.float64))


def curvature_fit(radii: np.ndarray, k: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, OLS of psi(k) on [1, log r, r^2] over the entries where ``mask``: (n, kappa).

    ``radii`` [T, m] at neighbour counts ``k`` [m]. Rows with fewer than 4 entries give NaN.
    Exact scale covariance: radii * s gives the same n and kappa / s^2.
    """
    r = np.asarray(radii, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        x, z = np.log(r), r * r
        y = np.broadcast_to(debiased_log_volume(k), r.shape)
        m = mask.sum(axis=-1)

        def centred(a: np.ndarray) -> np.ndarray:
            mean = np.where(mask, a, 0.0).sum(axis=-1, keepdims=True) / m[:, None]
            return np.where(mask, a - mean, 0.0)

        # centre z by its own scale so the 2x2 normal equations stay well conditioned
        scale = np.where(mask, z, 0.0).max(axis=-1, keepdims=True)
        dx, dz, dy = centred(x), centred(z / scale), centred(y)
        sxx, szz, sxz = (dx * dx).sum(-1), (dz * dz).sum(-1), (dx * dz).sum(-1)
        sxy, szy = (dx * dy).sum(-1), (dz * dy).sum(-1)
        det = sxx * szz - sxz * sxz
        n = (szz * sxy - sxz * szy) / det
        b = (sxx * szy - sxz * sxy) / det / scale[:, 0]
    kappa = -6.0 * (n + 2.0) * b
    bad = m < 4
    return np.where(bad, np.nan, n), np.where(bad, np.nan, kappa)


def pooled_curvature(radii: np.ndarray, k: np.ndarray) -> tuple[float, float]:
    """(n, kappa) of one fit to the mean log-radius curve of all rows (the geometric mean radius at each k).

    For a homogeneous cloud this averages the neighbour-count noise away before the fit, so the
    estimate is far less noisy than the median of per-row fits.
    """
    return mean_log_curvature(np.log(np.asarray(radii, dtype=np.float64)).mean(axis=0), k)


def mean_log_curvature(mean_log: np.ndarray, k: np.ndarray) -> tuple[float, float]:
    """(n, kappa) of the pooled fit from the mean log-radius at each k, which a caller can sum over
    chunks of rows instead of holding them all."""
    curve = np.exp(mean_log)[None, :]
    n, kappa = curvature_fit(curve, k, np.ones_like(curve, dtype=bool))
    return float(n[0]), float(kappa[0])
