"""Layer x head grids with bootstrap CIs over sequences (on the core's bootstrap_ci / bootstrap_ratio_ci)."""

from __future__ import annotations

import math

import numpy as np

from tensorscope_core.plugin_api import HeadValue, bootstrap_ci, bootstrap_ratio_ci


def _grid(values: np.ndarray) -> HeadValue:
    return HeadValue(values=[[None if not math.isfinite(v) else float(v) for v in row] for row in values])


def mean_grid(per_sequence: np.ndarray, *, seed: int, name: str) -> dict[str, HeadValue]:
    """Mean over sequences of [n_seq, layers, heads] values (NaN rows dropped per head), with
    percentile-bootstrap CIs resampling sequences: fields ``name``, ``name_ci_low``, ``name_ci_high``."""
    n_layers, n_heads = per_sequence.shape[1:]
    mean = np.full((n_layers, n_heads), np.nan)
    low, high = mean.copy(), mean.copy()
    for layer in range(n_layers):
        for head in range(n_heads):
            x = per_sequence[:, layer, head]
            x = x[np.isfinite(x)]
            if x.size:
                mean[layer, head] = x.mean()
                low[layer, head], high[layer, head] = bootstrap_ci(x, seed=seed)
    return {name: _grid(mean), f"{name}_ci_low": _grid(low), f"{name}_ci_high": _grid(high)}


def ratio_grid(sums: np.ndarray, counts: np.ndarray, *, seed: int, name: str) -> dict[str, HeadValue]:
    """sum over sequences of [n_seq, layers, heads] sums / sum of the [n_seq] counts (a
    token-weighted mean), with bootstrap CIs resampling sequences (``bootstrap_ratio_ci``)."""
    keep = counts > 0
    sums, counts = sums[keep], counts[keep]
    n_layers, n_heads = sums.shape[1:]
    total = counts.sum()
    mean = sums.sum(axis=0) / total if total else np.full((n_layers, n_heads), np.nan)
    low, high = np.full_like(mean, np.nan), np.full_like(mean, np.nan)
    for layer in range(n_layers):
        for head in range(n_heads):
            low[layer, head], high[layer, head] = bootstrap_ratio_ci(sums[:, layer, head], counts, seed=seed)
    return {name: _grid(mean), f"{name}_ci_low": _grid(low), f"{name}_ci_high": _grid(high)}
