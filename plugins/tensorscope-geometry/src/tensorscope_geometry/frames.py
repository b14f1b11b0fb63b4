"""Superposition geometry of a set of feature directions (Elhage et al. 2022, frame bounds).

Features are the rows f_i of F [n, d], in float64 throughout. Everything that only needs
the d x d matrix M = F^T F is computed from it (O(n d^2)); the pairwise |cos| statistics
need every pair, so they run over row chunks of the n x n cosine matrix (O(n^2 d)), and no
n x n matrix is ever held.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CHUNK_ENTRIES = 1 << 22  # cosines per chunk (32 MB)


@dataclass(frozen=True)
class FrameStats:
    n: int  # non-zero features
    d: int
    n_zero: int
    dimensions_per_feature: float  # Elhage D* = d / ||F||_F^2
    feature_dimensionality: torch.Tensor  # [n_all] D_i, NaN for zero features
    interference: torch.Tensor  # [n_all] sum_{j != i} (f^_i . f_j)^2, NaN for zero features
    mean_abs_cos: float
    max_abs_cos: float
    gram_offdiag_rms: float  # sqrt(mean_{i != j} (f_i . f_j)^2)
    frame_potential: float  # sum_{i,j} (u_i . u_j)^2 of the unit directions

    @property
    def welch_bound(self) -> float:
        return welch_bound(self.n, self.d)

    @property
    def frame_potential_min(self) -> float:
        """Tight-frame minimum n^2/d for n >= d (Benedetto & Fickus 2003); n (orthonormal) for n < d."""
        return self.n * self.n / self.d if self.n >= self.d else float(self.n)


def welch_bound(n: int, d: int) -> float:
    """Welch (1974) lower bound on max_{i != j} |cos| of n unit vectors in R^d: sqrt((n-d)/(d(n-1))), 0 for n <= d."""
    return math.sqrt((n - d) / (d * (n - 1))) if n > d else 0.0


def regime(n: int, d: int, max_abs_cos: float, orthogonal_cos: float, welch_slack: float) -> str:
    """The superposition regime label.

    n <= d: 'none' when max |cos| <= orthogonal_cos (room for orthogonal features, and they
    nearly are), else 'correlated'. n > d (interference is unavoidable): 'superposition_optimal'
    when max |cos| <= welch_slack * Welch bound (packed as evenly as possible, like the
    Mercedes frame), else 'superposition'.
    """
    if n <= d:
        return "none" if max_abs_cos <= orthogonal_cos else "correlated"
    return "superposition_optimal" if max_abs_cos <= welch_slack * welch_bound(n, d) else "superposition"


def frame_working_bytes(n: int, d: int) -> int:
    """Peak bytes ``frame_stats`` allocates for features [n, d] (zero rows included), from the shapes: its
    float64 copy (which becomes the unit directions in place), beside the larger of the d x d Gram matrix
    with the [n, d] product u M, or one chunk of |cos|; plus its [n] float64 vectors (norms, mask, the
    per-feature statistics and their temporaries: eight at most)."""
    chunk = min(n, max(1, CHUNK_ENTRIES // n)) * n
    return 8 * (n * d + max(d * d + n * d, chunk) + 8 * n)


def frame_stats(features: torch.Tensor) -> FrameStats:
    """Statistics of the rows of ``features`` [n, d]; zero rows are left out (and counted).

    One float64 copy of ``features`` is made (never written back: the caller's tensor may be a
    model's weight); it is compacted and normalised in place, so no second [n, d] copy is held."""
    f = features.detach().to(device="cpu", dtype=torch.float64, copy=True)
    n_all = f.shape[0]
    norms_all = f.norm(dim=1)
    nonzero = norms_all > 0
    f, norms = _compact_rows(f, nonzero), norms_all[nonzero]
    n, d = f.shape
    if n < 2:
        raise ValueError(f"need at least two non-zero feature directions, got {n} (of {n_all})")
    squared = norms.square()
    u, projected, offdiag_sq = _normalise(f, norms, squared)
    dim_i = torch.full((n_all,), math.nan, dtype=torch.float64)
    inter_i = dim_i.clone()
    dim_i[nonzero] = squared / projected
    inter_i[nonzero] = projected - squared
    frame_potential = float((u.T @ u).square().sum())
    abs_sum, abs_max = _pairwise_abs_cos(u)
    return FrameStats(n=n, d=d, n_zero=n_all - n, dimensions_per_feature=float(d / squared.sum()),
                      feature_dimensionality=dim_i, interference=inter_i, mean_abs_cos=abs_sum / (n * (n - 1)),
                      max_abs_cos=abs_max, gram_offdiag_rms=float((offdiag_sq / (n * (n - 1))).sqrt()),
                      frame_potential=frame_potential)


def _compact_rows(f: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The rows of ``f`` where ``keep``, moved up in place a chunk at a time (kept rows only move up, and
    each chunk is gathered before it is written), so dropping rows needs no second copy of ``f``."""
    if bool(keep.all()):
        return f
    index = keep.nonzero().squeeze(1)
    step = max(1, CHUNK_ENTRIES // max(1, f.shape[1]))
    for start in range(0, index.numel(), step):
        rows = index[start:start + step]
        f[start:start + rows.numel()] = f[rows]
    return f[:index.numel()]


def _normalise(f: torch.Tensor, norms: torch.Tensor, squared: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                          torch.Tensor]:
    """(unit directions u, sum_j (u_i . f_j)^2 per feature, sum_{i != j} (f_i . f_j)^2) from M = F^T F;
    ``f`` is divided by its norms in place (it is not needed once M is), and M is freed on return."""
    m = f.T @ f  # [d, d]
    offdiag_sq = (m.square().sum() - squared.square().sum()).clamp_min(0)
    u = f.div_(norms[:, None])
    return u, (u @ m).mul_(u).sum(1), offdiag_sq


def _pairwise_abs_cos(u: torch.Tensor) -> tuple[float, float]:
    """(sum, max) of |u_i . u_j| over i != j, by chunks of rows (one chunk held at a time)."""
    rows = max(1, CHUNK_ENTRIES // u.shape[0])
    total, largest = 0.0, 0.0
    for start in range(0, u.shape[0], rows):
        chunk_sum, chunk_max = _abs_cos_rows(u, start, rows)
        total, largest = total + chunk_sum, max(largest, chunk_max)
    return total, largest


def _abs_cos_rows(u: torch.Tensor, start: int, rows: int) -> tuple[float, float]:
    """(sum, max) of |u_i . u_j| for rows i in [start, start + rows), j != i; the block is freed on return."""
    block = (u[start:start + rows] @ u.T).abs_()
    idx = torch.arange(block.shape[0])
    block[idx, idx + start] = 0.0
    return float(block.sum()), float(block.max())
