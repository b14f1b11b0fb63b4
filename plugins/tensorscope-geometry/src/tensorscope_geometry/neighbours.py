"""Sorted distances to the k nearest rows of a point cloud, in chunks: never a V x V matrix.

Candidates come from the fast expansion ||a||^2 + ||b||^2 - 2 a.b (one float32 matrix product per
chunk of query rows, then ``torch.topk``); the chosen candidates' distances are then recomputed
from coordinate differences in float64. A rigorous bound on the expansion's rounding error
certifies, row by row, that no point outside the candidates can be nearer than the k-th
neighbour; a row that cannot be certified (near-ties at the cut) is recomputed exactly against
every point. The result therefore equals the dense float64 distance computation, up to the
summation order of the float64 differences.
"""

from __future__ import annotations

import torch

#: extra candidates taken beyond k, so that rounding in the expansion rarely forces a fallback
MARGIN = 16


#: unit roundoff of float32 matrix products at each torch.get_float32_matmul_precision(): full float32,
#: TF32 (10-bit mantissa) and bfloat16 (7-bit), which "high" and "medium" allow the backend to use
MATMUL_ROUNDOFF = {"highest": 2.0 ** -24, "high": 2.0 ** -11, "medium": 2.0 ** -8}


def expansion_error_bound(norm_q: torch.Tensor, max_norm: float, d: int, u: float = 2.0 ** -24) -> torch.Tensor:
    """Bound on |fl(||a||^2 + ||b||^2 - 2 a.b) - ||a - b||^2| for each query row, unit roundoff u.

    Any summation order of a length-d dot product errs by at most gamma_d * sum |a_i b_i| <=
    gamma_d ||a|| ||b|| (Higham, Accuracy and Stability, 3.1), gamma_d = d u / (1 - d u); the
    squared norms likewise and the two additions by u each, so the total is below
    (gamma_d + 3u) (||a|| + ||b||)^2. A factor 2 is added for safety; with d u >= 1 the bound is
    infinite (no row is certified and every row is computed exactly).
    """
    if d * u >= 1:
        return torch.full_like(norm_q, float("inf"))
    gamma = d * u / (1 - d * u)
    return 2.0 * (gamma + 3 * u) * (norm_q + max_norm) ** 2


def _candidate_distances(x: torch.Tensor, lo: int, idx: torch.Tensor) -> torch.Tensor:
    """Sorted float64 distances from rows lo.. of ``x`` to their candidates idx [rows, take], from
    differences, a few rows at a time so the [rows, take, d] float64 differences stay near 8 MiB."""
    rows, take = idx.shape
    step = max(1, (1 << 20) // (take * x.shape[1]))
    out = torch.empty(rows, take, dtype=torch.float64, device=x.device)
    for a in range(0, rows, step):
        b = min(a + step, rows)
        out[a:b] = (x[lo + a:lo + b, None, :].double() - x[idx[a:b]].double()).norm(dim=-1)
    return out.sort(dim=1).values


def _exact_row(x: torch.Tensor, i: int, block: int = 4096) -> torch.Tensor:
    """All distances from row i, sorted, in float64 from differences (blocks of rows: no float64 copy of x)."""
    a = x[i].double()
    return torch.cat([(a - x[c:c + block].double()).norm(dim=1) for c in range(0, x.shape[0], block)]).sort().values


def knn_radii(points: torch.Tensor, k: int, chunk_size: int = 512, workspace: torch.Tensor | None = None,
              rows: range | None = None) -> torch.Tensor:
    """[len(rows), k] float64: per query row (default: every row), the distances to its k nearest rows
    of ``points`` in ascending order (entry 0 is the row itself, 0). ``points`` [V, d] are used in
    float32. ``workspace``, when given, is a float32 buffer of at least [min(chunk_size, V), V]
    reused for every chunk's distance block.
    """
    x = points.detach().to(torch.float32)
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k = {k} neighbours need 1 <= k <= the number of points ({n})")
    take = min(k + MARGIN, n)
    u = MATMUL_ROUNDOFF.get(torch.get_float32_matmul_precision(), MATMUL_ROUNDOFF["medium"])
    sq = (x * x).sum(dim=1)
    max_norm = float(sq.max().sqrt())
    rows = range(n) if rows is None else rows
    if rows.step != 1 or not 0 <= rows.start <= rows.stop <= n:
        raise ValueError(f"rows must be a contiguous range inside 0..{n}, got {rows}")
    out = torch.empty(len(rows), k, dtype=torch.float64, device=x.device)
    for lo in range(rows.start, rows.stop, chunk_size):
        hi = min(lo + chunk_size, rows.stop)
        block = (workspace[: hi - lo, :n] if workspace is not None
                 else torch.empty(hi - lo, n, dtype=torch.float32, device=x.device))
        torch.matmul(x[lo:hi], x.T, out=block)
        block.mul_(-2.0).add_(sq[lo:hi, None]).add_(sq[None, :])
        approx, idx = torch.topk(block, take, dim=1, largest=False, sorted=True)
        exact = _candidate_distances(x, lo, idx)
        out[lo - rows.start:hi - rows.start] = exact[:, :k]
        if take == n:
            continue  # every point is a candidate: nothing left out
        bound = expansion_error_bound(sq[lo:hi].sqrt(), max_norm, d, u).double()
        # every point left out has approx >= approx[:, -1], so a true squared distance >= that - bound
        certified = exact[:, k - 1] ** 2 <= approx[:, -1].double() - bound
        for row in torch.nonzero(~certified).flatten().tolist():
            out[lo - rows.start + row] = _exact_row(x, lo + row)[:k]
    return out
