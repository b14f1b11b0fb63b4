"""Code lengths (bits) for MDL: the online code of a probe, quantised weights, and the architecture.

Online (prequential) code (Voita & Titov 2020): the examples are sent in blocks ending at
0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.25, 12.5, 25, 50 and 100% of the data; the first block with a
uniform code over the K classes, each later block with a probe fitted on everything sent
before it. L = t_1 log2 K + sum_i sum_{j in block i+1} -log2 p_i(y_j).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

#: block ends of the online code, in percent of the examples (Voita & Titov 2020)
BLOCK_ENDS = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.25, 12.5, 25.0, 50.0, 100.0)
#: bits that describe one tensor's quantiser (its offset and step, two float32)
QUANTISER_BITS = 64
#: float64 values quantised at once by ``quantised_entropy_bits`` (8 MiB)
LEVEL_CHUNK = 1 << 20

#: fit(x, y) -> per-row -ln p(y | x) of the rows given to it afterwards
Fit = Callable[[torch.Tensor, torch.Tensor], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


def block_ends(n: int) -> list[int]:
    """The examples sent after each block: ceil(percent x n), at least 1, increasing, ending at n."""
    ends = sorted({max(1, math.ceil(pct / 100.0 * n)) for pct in BLOCK_ENDS})
    return [e for e in ends if e <= n]


def online_code_bits(x: torch.Tensor, y: torch.Tensor, n_classes: int, fit: Fit) -> float:
    """Prequential code length (bits) of labels ``y`` given rows ``x``, sent in ``block_ends`` order."""
    ends = block_ends(len(y))
    bits = ends[0] * math.log2(n_classes)
    for start, stop in zip(ends[:-1], ends[1:], strict=True):
        nll = fit(x[:start], y[:start])(x[start:stop], y[start:stop])
        bits += float(nll.sum()) / math.log(2.0)
    return bits


def quantised_entropy_bits(weight: torch.Tensor, bits: int = 8, step: float | None = None) -> float:
    """Entropy code length (bits) of a tensor uniformly quantised per tensor.

    With ``step`` the grid is round(w / step); otherwise 2**bits levels from min to max. The code
    length is numel x the entropy of the empirical distribution of the levels: 0 for a constant
    tensor, ``bits`` per weight when every level is equally frequent, and about
    1/2 log2(2 pi e sigma^2) - log2 step for Gaussian weights with a fine step.
    """
    w = weight.detach().flatten()
    n = w.numel()
    if n == 0:
        return 0.0
    if step is None:
        low, high = float(w.min()), float(w.max())
        if high == low:
            return 0.0
        scale = (high - low) / (2**bits - 1)
        counts = level_counts(w, lambda c: c.sub_(low).div_(scale).round_())
    else:
        counts = level_counts(w, lambda c: c.div_(step).round_())
    p = counts.double() / n
    return float(-(p * torch.log2(p)).sum()) * n


def level_counts(w: torch.Tensor, to_level: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Counts of the distinct levels of flat ``w``, in ascending level order (as ``torch.unique``):
    ``LEVEL_CHUNK`` float64 values at a time, never a float64 copy of the whole tensor. ``to_level``
    works in place on a copy of each chunk."""
    levels = torch.empty(0, dtype=torch.float64)
    counts = torch.empty(0, dtype=torch.int64)
    for start in range(0, w.numel(), LEVEL_CHUNK):
        chunk_levels, chunk_counts = torch.unique(
            to_level(w[start : start + LEVEL_CHUNK].to("cpu", torch.float64, copy=True)), return_counts=True
        )
        levels, where = torch.unique(torch.cat([levels, chunk_levels]), return_inverse=True)
        counts = torch.zeros(len(levels), dtype=torch.int64).index_add_(0, where, torch.cat([counts, chunk_counts]))
    return counts


def elias_gamma_bits(n: int) -> int:
    """Length of the Elias gamma code of a positive integer: a universal code of integers."""
    return 2 * int(math.floor(math.log2(n))) + 1


def architecture_bits(shapes: Sequence[Sequence[int]]) -> int:
    """A universal code of the architecture: the number of tensors, each tensor's rank and
    sizes (Elias gamma of n + 1, so 0 is codable), and each tensor's quantiser."""
    total = elias_gamma_bits(len(shapes) + 1)
    for shape in shapes:
        total += elias_gamma_bits(len(shape) + 1) + sum(elias_gamma_bits(int(s) + 1) for s in shape)
        total += QUANTISER_BITS
    return total


def uniform_code_bits(n: int, n_classes: int) -> float:
    """n labels sent with a uniform code over the classes."""
    return n * math.log2(n_classes) if n_classes > 1 else 0.0
