"""Gram-matrix maths of CKA and RSA (float64, no model code).

Linear CKA (Kornblith et al. 2019) of one set of n examples is
``<HKH, HLH> / (||HKH|| ||HLH||)`` with ``K = X X^T``; debiased CKA replaces each inner
product by the unbiased HSIC U-statistic (Song et al. 2012), computed as the inner
product of Gram matrices centred by Szekely & Rizzo's (2014) unbiased centring, as in
Kornblith's ``center_gram(unbiased=True)`` (n(n-3) HSIC_1 = <K', L'>).

Over minibatches this module implements Nguyen, Raghu & Kornblith's (2021) minibatch
CKA exactly as their ``efficient_CKA.py`` accumulates it: the per-batch inner products are
summed over batches before the ratio is taken, ``CKA = sum_b <K'_b, L'_b> /
sqrt(sum_b <K'_b, K'_b> sum_b <L'_b, L'_b>)``. With equal batch sizes this is their
mean-of-HSIC_1 estimator; it is not the CKA of all examples pooled (cross-batch pairs
never enter), and with one batch it is exactly the full-data CKA.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import rankdata


def centred_gram(x: torch.Tensor) -> torch.Tensor:
    """Gram matrix [n, n] of the rows of ``x`` [n, p] after subtracting their mean: H X X^T H."""
    xc = x.double() - x.double().mean(0)
    return xc @ xc.T


def unbiased_centre(gram: torch.Tensor) -> torch.Tensor:
    """Szekely-Rizzo unbiased centring of a Gram matrix (n >= 4), so <K', L'> = n(n-3) HSIC_1(K, L)."""
    n = gram.shape[-1]
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 examples, got {n}")
    g = gram.double().clone()
    g.diagonal(dim1=-2, dim2=-1).zero_()
    means = g.sum(-2) / (n - 2)
    means = means - means.sum(-1, keepdim=True) / (2 * (n - 1))
    g = g - means.unsqueeze(-1) - means.unsqueeze(-2)
    g.diagonal(dim1=-2, dim2=-1).zero_()
    return g


def hsic_products(grams_a: torch.Tensor, grams_b: torch.Tensor) -> torch.Tensor:
    """Inner products <K_l, L_m> [La, Lb] of the (already centred) Grams [La, n, n] and [Lb, n, n] of one batch."""
    return grams_a.reshape(grams_a.shape[0], -1) @ grams_b.reshape(grams_b.shape[0], -1).T


def cka_ratio(cross: torch.Tensor, self_a: torch.Tensor, self_b: torch.Tensor) -> torch.Tensor:
    """cross[l, m] / sqrt(self_a[l] self_b[m]); NaN where a norm is 0 (a constant representation)."""
    denom = torch.sqrt(torch.outer(self_a, self_b))
    return torch.where(denom > 0, cross / denom.clamp_min(1e-300), torch.full_like(cross, math.nan))


def recentre(gram: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The centred Grams [L, k, k] of the kept examples, re-centred on their own mean."""
    sub = gram[:, keep][:, :, keep]
    return sub - sub.mean(-1, keepdim=True) - sub.mean(-2, keepdim=True) + sub.mean((-2, -1), keepdim=True)


def outlier_scores(grams: torch.Tensor) -> torch.Tensor:
    """Per example [n]: the largest over layers of its squared distance from the batch mean
    divided by the batch's mean squared distance (diag(HKH) / mean diag(HKH))."""
    d = grams.diagonal(dim1=-2, dim2=-1)  # [L, n]
    scale = d.mean(-1, keepdim=True)
    rel = torch.where(scale > 0, d / scale.clamp_min(1e-300), torch.zeros_like(d))
    return rel.max(0).values


def trimmed_keep(scores: torch.Tensor, fraction: float) -> torch.Tensor | None:
    """Indices of the examples kept once the ceil(fraction * n) highest scores are removed
    (ties broken by position); None when fewer than 4 examples would remain."""
    n = scores.shape[0]
    drop = math.ceil(fraction * n)
    if n - drop < 4:
        return None
    order = torch.argsort(scores, descending=True, stable=True)
    return order[drop:].sort().values


def correlation_matrix(x: torch.Tensor) -> torch.Tensor:
    """Pearson correlation [n, n] between the rows of ``x`` [n, p] over its p features (NaN for a constant row)."""
    z = x.double() - x.double().mean(1, keepdim=True)
    norms = z.norm(dim=1, keepdim=True)
    z = torch.where(norms > 0, z / norms.clamp_min(1e-300), torch.full_like(z, math.nan))
    return z @ z.T


def rdm_ranks(correlations: torch.Tensor) -> np.ndarray:
    """Standardised ranks [L, n(n-1)/2] of the upper triangles (i < j) of the RDMs 1 - corr of each layer.

    A row whose RDM is constant (or holds NaN) is all NaN, so its Spearman correlations are NaN.
    """
    n = correlations.shape[-1]
    iu = torch.triu_indices(n, n, offset=1)
    rdm = (1.0 - correlations[:, iu[0], iu[1]]).numpy()
    out = np.full(rdm.shape, np.nan)
    for row, values in enumerate(rdm):
        if np.isnan(values).any():
            continue
        ranks = rankdata(values)
        ranks -= ranks.mean()
        norm = np.linalg.norm(ranks)
        if norm > 0:
            out[row] = ranks / norm
    return out


def spearman_matrix(ranks_a: np.ndarray, ranks_b: np.ndarray) -> np.ndarray:
    """Spearman correlation [La, Lb] between RDMs from their standardised ranks (rdm_ranks)."""
    return ranks_a @ ranks_b.T
