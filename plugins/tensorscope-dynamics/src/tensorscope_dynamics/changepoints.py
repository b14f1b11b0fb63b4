"""Change points of one checkpoint series by PELT (``ruptures``), with the spec's penalty."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import ruptures as rpt

MIN_SIZE = 2  # the smallest segment PELT may cut; a change needs two points on each side
MAD_TO_SD = 1.4826  # MAD of a normal sample times this estimates its standard deviation


@dataclass(frozen=True)
class Change:
    """A change between positions ``index - 1`` and ``index`` of the series."""

    index: int
    mean_before: float
    mean_after: float
    pooled_sd: float

    @property
    def size_sd(self) -> float:
        """The jump in pooled standard deviations of the two segments around it (NaN if both are flat)."""
        if self.pooled_sd <= 0:
            return math.nan
        return (self.mean_after - self.mean_before) / self.pooled_sd


def noise_sd(y: np.ndarray) -> float:
    """sigma = MAD(first differences) * 1.4826 / sqrt(2): robust to the jumps themselves, since a
    jump changes one difference only. Falls back to the SD of the differences when more than
    half of them are equal (MAD 0), e.g. a noiseless step."""
    d = np.diff(y)
    mad = float(np.median(np.abs(d - np.median(d))))
    sigma = MAD_TO_SD * mad / math.sqrt(2)
    if sigma == 0.0 and len(d) > 1:
        sigma = float(np.std(d, ddof=1)) / math.sqrt(2)
    return sigma


def penalty(y: np.ndarray) -> float:
    """The PELT penalty 2 sigma^2 log n (BIC-like, for the l2 cost of a mean shift)."""
    return 2.0 * noise_sd(y) ** 2 * math.log(len(y))


def detect(values: list[float]) -> list[Change] | str:
    """The changes of ``values`` (in checkpoint order), or why none can be looked for."""
    y = np.asarray(values, dtype=np.float64)
    if len(y) < 2 * MIN_SIZE:
        return f"{len(y)} checkpoints: a change needs {MIN_SIZE} on each side ({2 * MIN_SIZE} in all)"
    if not np.all(np.isfinite(y)):
        return "the series has missing or non-finite values"
    pen = penalty(y)
    if pen == 0.0:
        return "the series has constant first differences (constant or exactly linear): no change in level"
    ends = rpt.Pelt(model="l2", min_size=MIN_SIZE, jump=1).fit(y.reshape(-1, 1)).predict(pen=pen)
    bounds = [0, *ends]
    out = []
    for k in range(1, len(bounds) - 1):
        before, after = y[bounds[k - 1] : bounds[k]], y[bounds[k] : bounds[k + 1]]
        dof = len(before) + len(after) - 2
        pooled = math.sqrt(
            (np.var(before, ddof=1) * (len(before) - 1) + np.var(after, ddof=1) * (len(after) - 1)) / dof
        )
        out.append(Change(bounds[k], float(before.mean()), float(after.mean()), pooled))
    return out
