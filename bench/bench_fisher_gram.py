"""fisher.spectrum's Gram trick and fisher.kfac's factored capacity against the dense matrices they avoid.

    python bench/bench_fisher_gram.py [--quick] [--threads N] [--reps R] [--out PATH]

1. **Gram trick** (``tensorscope_fisher.gram.gram_eigenvalues``): the spectrum of a Fisher block
   F = GᵀG / n from n per-example gradients G [n, p] through the n x n Gram matrix, against
   ``torch.linalg.eigvalsh`` of the explicitly built p x p F (float64). Same gradients (float32,
   seeded, with a decaying spectrum); the top-n eigenvalues must agree.
2. **Factored K-FAC capacity** (``tensorscope_fisher.kronecker``): trace, damped log-det and cond of
   A ⊗ G from the eigenvalues of A and G, against ``eigvalsh`` of the explicitly built Kronecker
   product (float64); the numbers must agree.

Repetitions are interleaved (ours, dense; dense, ours on the next one); each ratio pairs the two
runs of one repetition and is reported as median (min-max) of process CPU time (one thread) or wall
time (more threads). Memory is the bytes of the matrices each side builds, counted from their
shapes (float64): p² for the dense Fisher against n·p + n² for the Gram route; (dA·dG)² against
dA² + dG² + dA·dG for the factored capacity (the log-det sums the products in chunks of 2^20).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from bench_measure import Clock, spread, table, timed
from tensorscope_fisher.gram import gram_eigenvalues
from tensorscope_fisher.kronecker import factor_eigenvalues, kron_capacity

FULL = {"n": 64, "p": (1024, 2048, 4096), "kfac": ((33, 32), (49, 48), (65, 64)), "reps": 3}
QUICK = {"n": 32, "p": (256, 512), "kfac": ((17, 16), (25, 24)), "reps": 2}
DAMPING = 1e-3


def gradients(n: int, p: int, seed: int = 0) -> torch.Tensor:
    """Per-example gradients [n, p] (float32) whose singular values decay like 1/k."""
    gen = torch.Generator().manual_seed(seed)
    left = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(p, n, generator=gen, dtype=torch.float64))[0]
    return (left @ torch.diag(1.0 / torch.arange(1, n + 1, dtype=torch.float64)) @ right.T).float()


def factor(d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * d, d, generator=gen, dtype=torch.float64)
    return x.T @ x / (4 * d)


def dense_fisher_eigenvalues(g: torch.Tensor) -> torch.Tensor:
    x = g.double()
    return torch.linalg.eigvalsh(x.T @ x / x.shape[0]).flip(0)


def dense_capacity(a: torch.Tensor, g: torch.Tensor) -> dict[str, float]:
    lam = torch.linalg.eigvalsh(torch.kron(a, g)).clamp_min(0.0)
    return {"trace": float(lam.sum()), "logdet": float(torch.log(lam + DAMPING).sum()),
            "cond": float((lam.max() + DAMPING) / (lam.min() + DAMPING))}


def factored_capacity(a: torch.Tensor, g: torch.Tensor) -> dict[str, float]:
    return kron_capacity(factor_eigenvalues(a), factor_eigenvalues(g), DAMPING)


def interleaved(ours: Callable[[], Any], dense: Callable[[], Any], reps: int) -> tuple[list[Clock], list[Clock], Any]:
    """Time both ``reps`` times, alternating which goes first; returns the clocks and both last outputs."""
    mine, theirs, out = [], [], (None, None)
    for rep in range(reps):
        clocks = {"ours": Clock(), "dense": Clock()}
        order = (("ours", ours), ("dense", dense)) if rep % 2 == 0 else (("dense", dense), ("ours", ours))
        results = {}
        for name, fn in order:
            with timed(clocks[name]):
                results[name] = fn()
        mine.append(clocks["ours"])
        theirs.append(clocks["dense"])
        out = (results["ours"], results["dense"])
    return mine, theirs, out


def ratio(dense: list[Clock], ours: list[Clock], clock: str) -> dict[str, Any]:
    return spread([getattr(d, clock) / max(getattr(o, clock), 1e-9) for d, o in zip(dense, ours, strict=True)])


def bench(size: dict[str, Any], clock: str) -> dict[str, Any]:
    n, reps = size["n"], size["reps"]
    gram_rows = []
    for p in size["p"]:
        g = gradients(n, p)
        ours, dense, (mine, theirs) = interleaved(partial(gram_eigenvalues, g), partial(dense_fisher_eigenvalues, g),
                                                  reps)
        error = float((mine - theirs[:n]).abs().max() / theirs[0])
        gram_rows.append({"n": n, "p": p, "speedup": ratio(dense, ours, clock),
                          "bytes_dense": 8 * p * p, "bytes_ours": 8 * (n * p + n * n), "max_rel_error": error})
    kfac_rows = []
    for d_a, d_g in size["kfac"]:
        a, g = factor(d_a, 1), factor(d_g, 2)
        ours, dense, (mine, theirs) = interleaved(partial(factored_capacity, a, g), partial(dense_capacity, a, g),
                                                  reps)
        error = max(abs(mine[k] - theirs[k]) / abs(theirs[k]) for k in ("trace", "logdet", "cond"))
        kfac_rows.append({"dim_A": d_a, "dim_G": d_g, "speedup": ratio(dense, ours, clock),
                          "bytes_dense": 8 * (d_a * d_g) ** 2, "bytes_ours": 8 * (d_a * d_a + d_g * d_g + d_a * d_g),
                          "max_rel_error": error})
    return {"clock": clock, "reps": reps, "gram": gram_rows, "kfac": kfac_rows}


def _x(s: dict[str, Any]) -> str:
    return f"{s['median']:.1f}x ({s['min']:.1f}-{s['max']:.1f})"


def print_report(report: dict[str, Any]) -> None:
    print(f"fisher.spectrum Gram trick vs dense p x p eigh ({report['clock']} time, {report['reps']} reps)")
    print(table(["n", "p", "dense / ours", "memory dense / ours", "max rel. error"],
                [[r["n"], r["p"], _x(r["speedup"]), f"{r['bytes_dense'] / r['bytes_ours']:.0f}x",
                  f"{r['max_rel_error']:.1e}"] for r in report["gram"]]))
    print(f"\nfisher.kfac capacity from the factors vs eigh of A ⊗ G ({report['clock']} time)")
    print(table(["dim A", "dim G", "dense / ours", "memory dense / ours", "max rel. error"],
                [[r["dim_A"], r["dim_G"], _x(r["speedup"]), f"{r['bytes_dense'] / r['bytes_ours']:.0f}x",
                  f"{r['max_rel_error']:.1e}"] for r in report["kfac"]]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 repetitions (a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions")
    parser.add_argument("--out", type=Path, default=None, help="write the report as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = dict(QUICK if args.quick else FULL)
    if args.reps:
        size["reps"] = args.reps
    started = time.perf_counter()
    report = bench(size, "cpu" if args.threads == 1 else "wall")
    report["seconds_total"] = round(time.perf_counter() - started, 1)
    print_report(report)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
