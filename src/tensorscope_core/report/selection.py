"""What the report draws: which fields carry information (they change across checkpoints and
are not bookkeeping), how much they change, and where checkpoints sit on the step axis."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import numpy as np

#: bookkeeping fields: counts, sizes, seeds and iteration numbers describe the run, not the model;
#: they are in the tables and the JSON, never drawn
BOOKKEEPING = re.compile(
    r"^(n|n_.*|.*_count|counts?|iterations|converged|batches|tokens|test_tokens|sequences|classes|states|"
    r"target_states|sample_floor|seeds?|.*_seed|pca_dims|.*_edges|.*_communities)$")
#: confidence-interval bounds: drawn as the band of their value, never on their own
CI_BOUND = re.compile(r"^(.+)_ci_(low|high)$")
#: a quantity "changes" when its range across checkpoints exceeds this fraction of its magnitude
CHANGE_FLOOR = 0.02


def bookkeeping(field: str) -> bool:
    """Whether ``field`` (its last path part, e.g. ``true/n_examples``) counts something about the run."""
    return bool(BOOKKEEPING.match(field.rsplit("/", 1)[-1]))


def ci_bound(field: str) -> str | None:
    """The field a ``*_ci_low`` / ``*_ci_high`` field bounds, else None."""
    found = CI_BOUND.match(field)
    return found.group(1) if found else None


def relative_change(values: Sequence[np.ndarray]) -> float:
    """The largest change of any entry across checkpoints, as a fraction of the field's magnitude
    (its largest absolute value): 0 for a constant field, NaN when under two checkpoints have it."""
    arrays = [np.asarray(v, dtype=np.float64) for v in values]
    shapes = {a.shape for a in arrays}
    if len(arrays) < 2 or len(shapes) != 1:
        return float("nan")
    stack = np.stack(arrays)
    if not np.isfinite(stack).any():
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # entries missing on every checkpoint
        scale = float(np.nanmax(np.abs(stack)))
        spread = float(np.nanmax(np.nanmax(stack, axis=0) - np.nanmin(stack, axis=0)))
    return spread / scale if scale > 0 else 0.0


def changes(values: Sequence[np.ndarray]) -> bool:
    return bool(relative_change(values) > CHANGE_FLOOR)


def step_axis(steps: Sequence[int | None]) -> tuple[list[float], str]:
    """x positions of the checkpoints: their steps where every one has a step, else 0, 1, 2, ..."""
    if steps and all(s is not None for s in steps) and len(set(steps)) == len(steps):
        return [float(s) for s in steps if s is not None], "step"
    return [float(i) for i in range(len(steps))], "checkpoint"


def evenly(items: Sequence[str], k: int) -> list[str]:
    """At most ``k`` of ``items``, evenly spread, the first and the last included."""
    if len(items) <= k:
        return list(items)
    return [items[round(i)] for i in np.linspace(0, len(items) - 1, k)]
