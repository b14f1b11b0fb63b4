"""Gram-based null-space projection (what interventions.null_space does) against an explicit float64
P x P projector I - G^T pinv(G G^T) G, side by side on the same rows and gradient.

The explicit projector holds P^2 float64 entries: at P = 2e5 that is 320 GB, so it runs only up to
``--max-explicit`` (default 8000: 512 MB). At every P the Gram route is also checked against an
independent least-squares projection (``torch.linalg.lstsq``, no Gram, no eigendecomposition).

    python plugins/tensorscope-interventions/bench/bench_null_space.py [--sizes 2000 8000 200000] [--n 32]
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch
from tensorscope_interventions.projection import RowSpace


def timed(fn: Callable[[], torch.Tensor], repeat: int) -> tuple[float, torch.Tensor]:
    """Best wall time of ``repeat`` calls, and the result."""
    best, out = float("inf"), torch.zeros(0)
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def gram_route(rows: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return RowSpace.of(rows, [slice(0, rows.shape[1])], 1e-10).project(g)


def explicit_route(rows: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    G = rows.double()
    projector = torch.eye(G.shape[1], dtype=torch.float64) - G.T @ torch.linalg.pinv(G @ G.T) @ G
    return projector @ g


def lstsq_route(rows: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    G = rows.double()
    return g - G.T @ torch.linalg.lstsq(G.T, g[:, None]).solution[:, 0]


def row(size: int, n: int, max_explicit: int) -> str:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(n, size, generator=gen)  # float32, as the per-example gradients
    g = torch.randn(size, generator=gen, dtype=torch.float64)
    gram_s, fast = timed(functools.partial(gram_route, rows, g), repeat=3)
    lstsq = float((fast - lstsq_route(rows, g)).abs().max())
    leak = float((rows.double() @ fast).abs().max())
    if size > max_explicit:
        return (
            f"{size:>8} {n:>3} {gram_s:>9.4f} {f'({size * size * 8 / 1e9:.0f} GB)':>10} {'-':>8} {'-':>19} "
            f"{lstsq:>16.2e} {leak:>10.2e}"
        )
    explicit_s, slow = timed(functools.partial(explicit_route, rows, g), repeat=1)
    diff = float((fast - slow).abs().max())
    return (
        f"{size:>8} {n:>3} {gram_s:>9.4f} {explicit_s:>10.3f} {explicit_s / gram_s:>8.0f} {diff:>19.2e} "
        f"{lstsq:>16.2e} {leak:>10.2e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 200_000])
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--max-explicit", type=int, default=8000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"{'P':>8} {'n':>3} {'gram s':>9} {'explicit s':>10} {'ratio':>8} {'max|diff| explicit':>19} "
        f"{'max|diff| lstsq':>16} {'max|G Pg|':>10}"
    )
    for size in args.sizes:
        print(row(size, args.n, args.max_explicit), flush=True)


if __name__ == "__main__":
    main()
