"""Count-sketch projection of gradient rows, with the measured error of the projected squared norms."""

from __future__ import annotations

import math

import torch

from tensorscope_core.plugin_api import CountSketch


class Projection:
    """Projects rows with a seeded ``CountSketch`` (the same for every batch and checkpoint of a run,
    and the one the core's ``per_example_grads`` artifact sketches with when asked) and measures, for
    every row g, |(||Sg||^2 - ||g||^2)| / ||g||^2 against the exact squared norm: ``error`` is its RMS,
    ``bound`` = sqrt(2/k) the bound on its standard deviation (the variance of a count sketch's squared
    norm is 2 (||g||^4 - sum_j g_j^4) / k). A row's own norm is all a sketch made one example at a time
    can be checked against, so the error is the same whichever makes the sketch."""

    def __init__(self, size: int, k: int, seed: int) -> None:
        self.sketch = CountSketch(size, k, seed)
        self.squares = 0.0
        self.rows = 0

    def __call__(self, rows: torch.Tensor, squares: torch.Tensor) -> torch.Tensor:
        """The projected rows [n, k] in float64, given the exact squared norms [n] (``row_squares``)."""
        return self.measured(self.sketch(rows), squares)

    def measured(self, projected: torch.Tensor, squares: torch.Tensor) -> torch.Tensor:
        """Record the error of sketched rows [n, k] against their exact squared norms [n]; the rows back."""
        keep = squares > 0
        relative = (projected.square().sum(dim=1)[keep] - squares[keep]) / squares[keep]
        self.squares += float(relative.square().sum())
        self.rows += int(keep.sum())
        return projected

    @property
    def error(self) -> float:
        return math.sqrt(self.squares / self.rows) if self.rows else math.nan

    @property
    def bound(self) -> float:
        return self.sketch.std_bound
