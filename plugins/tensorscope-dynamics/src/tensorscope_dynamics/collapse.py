"""Rank collapse of token representations (Dong et al. 2021), per sequence."""

from __future__ import annotations

import torch


def collapse_stats(x: torch.Tensor) -> tuple[float, float]:
    """For one sequence's tokens x [n, d] (n >= 2): the mean pairwise cosine over i != j, and
    the relative residual |X - 1 xbar^T|_F / |X|_F (0 when every token is the same vector)."""
    x = x.double()
    n = x.shape[0]
    unit = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)
    total = unit.sum(0).square().sum()
    cosine = float((total - n) / (n * (n - 1)))
    norm = x.norm()
    residual = float((x - x.mean(0)).norm() / norm) if norm > 0 else 0.0
    return cosine, residual
