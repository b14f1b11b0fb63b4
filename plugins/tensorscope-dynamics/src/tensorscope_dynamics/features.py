"""Feature statistics of plasticity: dormant units and the srank of a feature matrix."""

from __future__ import annotations

import torch


def dormant_mask(mean_abs: torch.Tensor, tau: float) -> torch.Tensor:
    """Units with s_i = E|h_i| / mean_k E|h_k| <= tau (Sokar et al. 2023), per row of
    ``mean_abs`` [layers, units]; a layer whose units are all silent has every unit dormant."""
    mean = mean_abs.mean(-1, keepdim=True)
    score = torch.where(mean > 0, mean_abs / mean.clamp_min(1e-300), torch.zeros_like(mean_abs))
    return score <= tau


def srank(features: torch.Tensor, delta: float) -> int:
    """srank_delta (Kumar et al. 2021): the smallest k with sum_{i<=k} sigma_i >= (1 - delta) sum sigma,
    over the singular values of ``features`` [n, d] (uncentred, float64). 0 for a zero matrix."""
    sigma = torch.linalg.svdvals(features.double())
    total = float(sigma.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(sigma, 0) / total
    return int((cumulative < 1.0 - delta - 1e-12).sum()) + 1
