"""Reference CKA / RSA written from the papers' code, in numpy float64 (independent of the plugin).

``gram_cka`` follows Kornblith's Demo.ipynb (center_gram with and without unbiased=True);
``feature_cka`` its feature_space_linear_cka (the debiased feature-space form); ``rsa``
uses scipy's correlation distance and Spearman correlation.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr


def center_gram(gram: np.ndarray, unbiased: bool = False) -> np.ndarray:
    gram = gram.astype(np.float64).copy()
    n = gram.shape[0]
    if unbiased:
        np.fill_diagonal(gram, 0)
        means = gram.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        gram -= means[:, None]
        gram -= means[None, :]
        np.fill_diagonal(gram, 0)
    else:
        means = gram.mean(0)
        means -= means.mean() / 2
        gram -= means[:, None]
        gram -= means[None, :]
    return gram


def gram_products(x: np.ndarray, y: np.ndarray, debiased: bool) -> tuple[float, float, float]:
    """(<Kc, Lc>, <Kc, Kc>, <Lc, Lc>) of one set of examples."""
    k, l_ = center_gram(x @ x.T, debiased), center_gram(y @ y.T, debiased)
    return float((k * l_).sum()), float((k * k).sum()), float((l_ * l_).sum())


def gram_cka(x: np.ndarray, y: np.ndarray, debiased: bool = False) -> float:
    xy, xx, yy = gram_products(x, y, debiased)
    return xy / np.sqrt(xx * yy)


def minibatch_cka(batches: list[tuple[np.ndarray, np.ndarray]], debiased: bool = False) -> float:
    """Nguyen et al.'s minibatch CKA: per-batch products summed before the ratio."""
    sums = np.sum([gram_products(x, y, debiased) for x, y in batches], axis=0)
    return float(sums[0] / np.sqrt(sums[1] * sums[2]))


def _debiased_dot(xty: float, sx: np.ndarray, sy: np.ndarray, nx: float, ny: float, n: int) -> float:
    return xty - n / (n - 2.0) * float(sx.dot(sy)) + nx * ny / ((n - 1) * (n - 2))


def feature_cka(x: np.ndarray, y: np.ndarray, debiased: bool = False) -> float:
    x = x - x.mean(0, keepdims=True)
    y = y - y.mean(0, keepdims=True)
    xy = np.linalg.norm(x.T @ y) ** 2
    xx = np.linalg.norm(x.T @ x)
    yy = np.linalg.norm(y.T @ y)
    if not debiased:
        return float(xy / (xx * yy))
    n = x.shape[0]
    sx, sy = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)
    nx, ny = sx.sum(), sy.sum()
    xy = _debiased_dot(xy, sx, sy, nx, ny, n)
    xx = np.sqrt(_debiased_dot(xx ** 2, sx, sx, nx, nx, n))
    yy = np.sqrt(_debiased_dot(yy ** 2, sy, sy, ny, ny, n))
    return float(xy / (xx * yy))


def rsa(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation of the condensed correlation-distance RDMs (1 - Pearson) of two representations."""
    return float(spearmanr(pdist(x, "correlation"), pdist(y, "correlation"))[0])
