"""Count-sketch projection of gradient rows, with the measured error of the projected dot products."""

from __future__ import annotations

import math

import torch

from tensorscope_core.plugin_api import CountSketch


class Projection:
    """Projects rows with a seeded ``CountSketch`` (the same for every batch and checkpoint of a
    run) and measures, within each batch, |Sg . Sh - g . h| / (||g|| ||h||) over the pairs (self
    pairs included) against the exact products: ``error`` is its RMS, ``bound`` = sqrt(2/k) the
    bound on its standard deviation."""

    def __init__(self, size: int, k: int, seed: int) -> None:
        self.sketch = CountSketch(size, k, seed)
        self.squares = 0.0
        self.pairs = 0

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """The projected rows [n, k] in float64."""
        exact = rows.double().cpu()
        projected = self.sketch(exact)
        iu = torch.triu_indices(len(exact), len(exact))
        norms = exact.norm(dim=1)
        denom = (norms[:, None] * norms[None, :])[iu[0], iu[1]]
        err = ((projected @ projected.T) - (exact @ exact.T))[iu[0], iu[1]]
        keep = denom > 0
        self.squares += float((err[keep] / denom[keep]).pow(2).sum())
        self.pairs += int(keep.sum())
        return projected

    @property
    def error(self) -> float:
        return math.sqrt(self.squares / self.pairs) if self.pairs else math.nan

    @property
    def bound(self) -> float:
        return self.sketch.std_bound
