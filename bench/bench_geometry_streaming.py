"""Geometry metrics that stream over batches against the hold-everything computations they replace.

    python bench/bench_geometry_streaming.py [--quick] [--threads N] [--reps R] [--clock cpu|wall] [--out PATH]

Three pairs, each timed side by side on the same float64 inputs (interleaved repetitions,
median ratio with min-max), with the bytes each side holds and how far the answers differ:

1. ``effective_rank``: the plugin's streaming covariance (``CovarianceAccumulator``: a d x d
   scatter merged batch by batch, then ``eigvalsh``) against ``torch.linalg.svdvals`` of all
   tokens' centred activations stacked [N, d]. Same erank to rounding.
2. ``cka``: the plugin's minibatch CKA (``geometry.similarity_terms`` builds one centred Gram
   per batch and layer, ``geometry.cka`` sums their inner products; here on every token of
   each batch) against full-data linear CKA in feature space, ||X_l^T X_m||_F^2 /
   (||X_l^T X_l|| ||X_m^T X_m||), which holds every layer's activations of all N tokens. These
   are different estimators (minibatch CKA never pairs tokens of different batches): the
   table gives their largest difference, and ours is checked against the minibatch
   reference formula on one pair.
3. ``frame``: ``superposition.features`` statistics of n feature directions, pairwise cosines
   by row chunks, against the same statistics from the dense n x n cosine matrix.

Inputs are synthetic (seeded): activations with a shared low-rank part plus noise, features
drawn at random. The full run takes about a minute on one core.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from bench_measure import Clock, bench_main, spread, table, timed
from tensorscope_geometry.frames import CHUNK_ENTRIES, frame_stats
from tensorscope_geometry.kernels import centred_gram
from tensorscope_geometry.similarity import Terms, cka_sums
from tensorscope_geometry.spectra import CovarianceAccumulator, covariance_singular_values, effective_rank


@dataclass(frozen=True)
class Size:
    layers: int
    d: int
    batches: int
    tokens_per_batch: int
    features: int
    reps: int


FULL = Size(layers=7, d=768, batches=16, tokens_per_batch=256, features=8192, reps=3)
QUICK = Size(layers=3, d=64, batches=4, tokens_per_batch=64, features=1024, reps=2)


def activations(size: Size, seed: int = 0) -> list[list[torch.Tensor]]:
    """[batch][layer] float64 [tokens_per_batch, d]: a shared rank-d/8 signal, rotated per layer, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    rank = max(2, size.d // 8)
    mixes = [torch.randn(rank, size.d, generator=gen, dtype=torch.float64) for _ in range(size.layers)]
    out = []
    for _ in range(size.batches):
        z = torch.randn(size.tokens_per_batch, rank, generator=gen, dtype=torch.float64)
        out.append([z @ m + 0.3 * torch.randn(size.tokens_per_batch, size.d, generator=gen, dtype=torch.float64)
                    + 2.0 for m in mixes])
    return out


# -- 1. effective rank ------------------------------------------------------------------------

def erank_streaming(batches: list[torch.Tensor]) -> tuple[float, int]:
    acc = CovarianceAccumulator(batches[0].shape[1])
    for x in batches:
        acc.add(x)
    s, _ = covariance_singular_values(acc.scatter)
    return effective_rank(s), acc.scatter.nbytes + acc.mean.nbytes


def erank_stacked(batches: list[torch.Tensor]) -> tuple[float, int]:
    x = torch.cat(batches)
    centred = x - x.mean(0)
    return effective_rank(torch.linalg.svdvals(centred)), x.nbytes + centred.nbytes


# -- 2. CKA -----------------------------------------------------------------------------------

def cka_minibatch(acts: list[list[torch.Tensor]]) -> tuple[torch.Tensor, int]:
    n = acts[0][0].shape[0]
    grams = torch.stack([torch.stack([centred_gram(x) for x in layers]) for layers in acts])
    terms = Terms(grams, grams, torch.zeros(len(acts), n), [n] * len(acts))
    return cka_sums(terms, terms, debiased=False, trim_fraction=None).cka(), grams.nbytes


def cka_full_data(acts: list[list[torch.Tensor]]) -> tuple[torch.Tensor, int]:
    layers = [torch.cat([batch[layer] for batch in acts]) for layer in range(len(acts[0]))]
    centred = [x - x.mean(0) for x in layers]
    self_norms = torch.stack([torch.linalg.matrix_norm(x.T @ x) for x in centred])
    cross = torch.stack([torch.stack([torch.linalg.matrix_norm(a.T @ b).square() for b in centred])
                         for a in centred])
    held = sum(x.nbytes for x in layers) + sum(x.nbytes for x in centred)
    return cross / torch.outer(self_norms, self_norms), held


def cka_reference_pair(acts: list[list[torch.Tensor]], i: int, j: int) -> float:
    """Minibatch CKA of one layer pair written out from the formula (HKH per batch, sums, ratio)."""
    sums = torch.zeros(3, dtype=torch.float64)
    for batch in acts:
        n = batch[i].shape[0]
        h = torch.eye(n, dtype=torch.float64) - 1.0 / n
        k, m = h @ batch[i] @ batch[i].T @ h, h @ batch[j] @ batch[j].T @ h
        sums += torch.stack([(k * m).sum(), (k * k).sum(), (m * m).sum()])
    return float(sums[0] / (sums[1] * sums[2]).sqrt())


# -- 3. frame statistics ----------------------------------------------------------------------

def frame_chunked(f: torch.Tensor) -> tuple[tuple[float, float, float], int]:
    s = frame_stats(f)
    held = 8 * (min(CHUNK_ENTRIES, f.shape[0] * f.shape[0]) + 3 * f.shape[1] ** 2 + 3 * f.numel())
    return (s.mean_abs_cos, s.max_abs_cos, s.frame_potential), held


def frame_dense(f: torch.Tensor) -> tuple[tuple[float, float, float], int]:
    u = f / f.norm(dim=1, keepdim=True)
    cos = u @ u.T
    n = f.shape[0]
    off = cos.abs().fill_diagonal_(0.0)
    return (float(off.sum() / (n * (n - 1))), float(off.max()), float(cos.square().sum())), cos.nbytes + u.nbytes


# -- the harness --------------------------------------------------------------------------------

Pair = tuple[str, Callable[[], tuple[Any, int]], Callable[[], tuple[Any, int]]]


def interleaved(ours: Callable[[], tuple[Any, int]], theirs: Callable[[], tuple[Any, int]], reps: int,
                ) -> tuple[list[Clock], list[Clock], Any, Any, int, int]:
    mine, base = [], []
    out_a = out_b = None
    bytes_a = bytes_b = 0
    for rep in range(reps):
        order = [("a", ours), ("b", theirs)] if rep % 2 == 0 else [("b", theirs), ("a", ours)]
        for side, fn in order:
            clock = Clock()
            with timed(clock):
                out, held = fn()
            if side == "a":
                mine.append(clock)
                out_a, bytes_a = out, held
            else:
                base.append(clock)
                out_b, bytes_b = out, held
    return mine, base, out_a, out_b, bytes_a, bytes_b


def bench(size: Size, primary: str) -> dict[str, Any]:
    acts = activations(size)
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(size.features, size.d, generator=gen, dtype=torch.float64)
    layer0 = [b[0] for b in acts]
    report: dict[str, Any] = {"size": size.__dict__, "clock": primary, "pairs": {}}

    pairs: list[Pair] = [
        ("effective_rank", lambda: erank_streaming(layer0), lambda: erank_stacked(layer0)),
        ("cka", lambda: cka_minibatch(acts), lambda: cka_full_data(acts)),
        ("frame", lambda: frame_chunked(features), lambda: frame_dense(features)),
    ]
    for name, ours, theirs in pairs:
        mine, base, out_a, out_b, bytes_a, bytes_b = interleaved(ours, theirs, size.reps)
        ratios = [getattr(a, primary) / max(getattr(b, primary), 1e-12) for a, b in zip(mine, base, strict=True)]
        if name == "cka":
            difference = float((out_a - out_b).abs().max())
            check = abs(float(out_a[0, 1]) - cka_reference_pair(acts, 0, 1))
        else:
            pa = torch.tensor(out_a if isinstance(out_a, tuple) else [out_a], dtype=torch.float64)
            pb = torch.tensor(out_b if isinstance(out_b, tuple) else [out_b], dtype=torch.float64)
            difference = float(((pa - pb).abs() / pb.abs().clamp_min(1e-300)).max())
            check = difference
        report["pairs"][name] = {
            "time_ratio": spread(ratios), "ours_seconds": statistics.median(getattr(c, primary) for c in mine),
            "baseline_seconds": statistics.median(getattr(c, primary) for c in base),
            "ours_bytes": bytes_a, "baseline_bytes": bytes_b, "memory_ratio": bytes_a / bytes_b,
            "difference": difference, "check": check}
    return report


def print_report(report: dict[str, Any]) -> None:
    rows = []
    labels = {"effective_rank": "erank: streamed covariance / stacked SVD",
              "cka": "CKA: minibatch Grams / full-data features",
              "frame": "frame: chunked cosines / dense n x n"}
    for name, r in report["pairs"].items():
        t = r["time_ratio"]
        rows.append([labels[name], f"{t['median']:.3f} ({t['min']:.3f}-{t['max']:.3f})",
                     f"{r['ours_bytes'] / 2**20:.1f} / {r['baseline_bytes'] / 2**20:.1f} MiB",
                     f"{r['memory_ratio']:.4f}", f"{r['difference']:.2e}", f"{r['check']:.2e}"])
    print(table(["pair (ours / baseline)", f"time ratio ({report['clock']})", "held", "memory ratio",
                 "max difference", "check"], rows))
    print("difference: relative for erank and frame; absolute between the two CKA estimators. check: ours "
          "against the same estimator written out (CKA: minibatch formula on layers 0, 1).")


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(__doc__, "small shapes (a smoke run of a few seconds)",
                      (QUICK, FULL), bench, print_report, argv)


if __name__ == "__main__":
    sys.exit(main())
