"""Projection onto the orthogonal complement of a row space, through the n x n Gram matrix only.

For protected rows G [n, P] (n << P) the row space has the orthonormal basis Q = G^T C [P, r], with
C = V_r diag(lambda_r)^(-1/2) from the eigendecomposition K = G G^T = V diag(lambda) V^T (float64),
keeping the r eigenvalues above ``rtol * lambda_max``. Then Q^T Q = C^T K C = I_r and

    P g = g - Q Q^T g = g - G^T (C C^T (G g)),

so neither Q nor the P x P projector is ever formed: the work is two passes over G, and what is
held besides G is n x n and the projected vector. Rows (and vectors, in reductions) are read in column
chunks, so a float32 G is never copied to float64 whole and no P-long temporary is made beside the
result. ``spans`` restrict everything to some columns (one layer's parameters) without copying G.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

#: columns of G read at a time (bounds the float64 transient of one chunk: n x CHUNK x 8 bytes)
CHUNK = 1 << 18

Spans = Sequence[slice]


def _chunks(spans: Spans) -> list[slice]:
    """``spans`` cut into pieces of at most CHUNK columns."""
    out = []
    for span in spans:
        for start in range(span.start, span.stop, CHUNK):
            out.append(slice(start, min(start + CHUNK, span.stop)))
    return out


def span_size(spans: Spans) -> int:
    return sum(s.stop - s.start for s in spans)


def gram(rows: torch.Tensor, spans: Spans) -> torch.Tensor:
    """G_S G_S^T in float64 [n, n], over the columns in ``spans``."""
    out = torch.zeros(rows.shape[0], rows.shape[0], dtype=torch.float64)
    for piece in _chunks(spans):
        block = rows[:, piece].double()
        out += (block @ block.T).cpu()
    return out


def rows_times(rows: torch.Tensor, spans: Spans, g: torch.Tensor) -> torch.Tensor:
    """G_S g in float64 [n]; ``g`` holds only the columns of ``spans``, in their order."""
    out = torch.zeros(rows.shape[0], dtype=torch.float64)
    offset = 0
    for piece in _chunks(spans):
        width = piece.stop - piece.start
        out += (rows[:, piece].double() @ g[offset : offset + width].double().to(rows.device)).cpu()
        offset += width
    return out


def subtract_rows_transpose_times(out: torch.Tensor, rows: torch.Tensor, spans: Spans, c: torch.Tensor) -> None:
    """out -= G_S^T c in place (``out``: float64 [size of spans]), a column chunk at a time."""
    c = c.to(device=rows.device, dtype=torch.float64)
    offset = 0
    for piece in _chunks(spans):
        width = piece.stop - piece.start
        out[offset : offset + width] -= (c @ rows[:, piece].double()).cpu()
        offset += width


def add_column_sums(total: torch.Tensor, rows: torch.Tensor) -> None:
    """total += rows.sum(dim=0) in float64 (``total``: float64 [P] on the CPU), a column chunk at a time:
    a float64 copy of all of ``rows`` [batch, P] would be twice their float32 bytes."""
    for piece in _chunks([slice(0, rows.shape[1])]):
        total[piece] += rows[:, piece].double().sum(dim=0).cpu()


def _chunked_sum(size: int, term: Callable[[slice], torch.Tensor]) -> float:
    """The sum of ``term(piece)`` over the column chunks of [0, size): a reduction of P-long vectors
    without a P-long temporary."""
    return float(sum((term(piece) for piece in _chunks([slice(0, size)])), torch.zeros((), dtype=torch.float64)))


@dataclass(frozen=True)
class RowSpace:
    """An orthonormal basis Q = G_S^T ``coef`` of the row space of G over ``spans``."""

    rows: torch.Tensor
    spans: tuple[slice, ...]
    coef: torch.Tensor  # [n, r] float64
    eigenvalues: torch.Tensor  # [n] float64, descending: the Gram's spectrum
    threshold: float  # eigenvalues at or below it were dropped

    @property
    def rank(self) -> int:
        return int(self.coef.shape[1])

    @classmethod
    def of(cls, rows: torch.Tensor, spans: Spans, rtol: float) -> RowSpace:
        """The basis from the float64 Gram's eigendecomposition, keeping eigenvalues > rtol x the largest."""
        values, vectors = torch.linalg.eigh(gram(rows, spans))
        values, vectors = values.flip(0), vectors.flip(1)
        top = float(values[0]) if len(values) else 0.0
        threshold = rtol * top
        keep = values > threshold if top > 0 else torch.zeros_like(values, dtype=torch.bool)
        coef = vectors[:, keep] / values[keep].sqrt()
        return cls(rows, tuple(spans), coef, values, threshold)

    def coordinates(self, g: torch.Tensor) -> torch.Tensor:
        """Q^T g [r] (float64)."""
        return self.coef.T @ rows_times(self.rows, self.spans, g)

    def project(self, g: torch.Tensor) -> torch.Tensor:
        """P g = g - Q Q^T g: g with its row-space part removed (a new float64 vector; Q Q^T g is
        subtracted from a copy of g chunk by chunk, never held whole)."""
        out = g.to(device="cpu", dtype=torch.float64, copy=True)
        subtract_rows_transpose_times(out, self.rows, self.spans, self.coef @ self.coordinates(g))
        return out


@dataclass(frozen=True)
class ProjectionStats:
    """How much of g a row space removes, and how orthogonal the rest is to the rows."""

    removed_fraction: float  # |Q Q^T g|^2 / |g|^2
    cosine: float  # cos(g, P g)
    max_abs_dot: float  # max_i |g_i . P g| over the protected rows
    max_abs_dot_relative: float  # max_i |g_i . P g| / (|g_i| |g|)
    rank: int
    threshold: float


def projection_stats(space: RowSpace, g: torch.Tensor, projected: torch.Tensor) -> ProjectionStats:
    """The statistics of ``projected`` = ``space.project(g)``, each computed from the vectors themselves."""
    g = g.double().cpu()
    g_sq = _chunked_sum(len(g), lambda s: g[s].square().sum())
    removed_sq = _chunked_sum(len(g), lambda s: (g[s] - projected[s]).square().sum())
    p_norm = float(projected.norm())
    dots = rows_times(space.rows, space.spans, projected).abs()
    row_norms = gram_diagonal(space.rows, space.spans).sqrt()
    scale = row_norms * g_sq**0.5
    relative = torch.where(scale > 0, dots / torch.where(scale > 0, scale, torch.ones_like(scale)), 0.0)
    nan = float("nan")
    return ProjectionStats(
        removed_fraction=removed_sq / g_sq if g_sq > 0 else nan,
        cosine=float(g @ projected) / (g_sq**0.5 * p_norm) if g_sq > 0 and p_norm > 0 else nan,
        max_abs_dot=float(dots.max()) if len(dots) else 0.0,
        max_abs_dot_relative=float(relative.max()) if len(relative) else 0.0,
        rank=space.rank,
        threshold=space.threshold,
    )


def gram_diagonal(rows: torch.Tensor, spans: Spans) -> torch.Tensor:
    """|g_i|^2 over the columns of ``spans``, float64 [n]."""
    out = torch.zeros(rows.shape[0], dtype=torch.float64)
    for piece in _chunks(spans):
        out += rows[:, piece].double().square().sum(dim=1).cpu()
    return out
