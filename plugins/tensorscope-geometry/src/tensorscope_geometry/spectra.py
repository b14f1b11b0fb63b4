"""Spectral summaries (effective rank, participation ratio) and a streaming covariance.

The covariance is accumulated batch by batch with the pairwise merge of Chan, Golub and
LeVeque (1979), in float64, so activations of every batch never need to be held at once
and the centring loses no precision to a large common mean.
"""

from __future__ import annotations

import torch


def effective_rank(singular_values: torch.Tensor) -> float:
    """Roy & Vetterli (2007): exp(-sum p_k ln p_k) with p_k = s_k / sum s (zeros dropped); 0 for all-zero input."""
    s = singular_values.double().clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def participation_ratio(eigenvalues: torch.Tensor) -> float:
    """(sum l)^2 / sum l^2 of non-negative eigenvalues (a covariance's); 0 for all-zero input."""
    lam = eigenvalues.double().clamp_min(0)
    squares = lam.square().sum()
    return float(lam.sum().square() / squares) if squares > 0 else 0.0


def covariance_singular_values(scatter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(singular values of the centred data matrix, covariance eigenvalues) from its scatter X_c^T X_c.

    Descending. The scatter's eigenvalues are the squared singular values; tiny negative
    rounding is clamped to 0.
    """
    eig = torch.linalg.eigvalsh(scatter.double()).flip(0).clamp_min(0)
    return eig.sqrt(), eig


class CovarianceAccumulator:
    """Running count, mean [d] and centred scatter sum_i (x_i - mean)(x_i - mean)^T [d, d], float64."""

    def __init__(self, dim: int) -> None:
        self.count = torch.zeros((), dtype=torch.float64)
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, rows: torch.Tensor) -> None:
        """Fold the rows [n, d] of one batch in (Chan et al.'s merge of two partial results)."""
        if rows.shape[0] == 0:
            return
        x = rows.detach().double().cpu()
        n_b = float(x.shape[0])
        mean_b = x.mean(0)
        centred = x - mean_b
        delta = mean_b - self.mean
        n_a = float(self.count)
        n = n_a + n_b
        self.scatter += centred.T @ centred + torch.outer(delta, delta) * (n_a * n_b / n)
        self.mean += delta * (n_b / n)
        self.count += n_b

    @staticmethod
    def declared_bytes(dim: int) -> int:
        return 8 * (1 + dim + dim * dim)
