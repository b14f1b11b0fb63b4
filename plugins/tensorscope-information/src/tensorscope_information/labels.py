"""Discrete targets: the next token restricted to its most frequent values, and plug-in entropies.

A probe over a 50k-token vocabulary on a few thousand tokens sees most classes once or never,
so the target is restricted to the K most frequent tokens plus one class "other" for the rest.
"""

from __future__ import annotations

import numpy as np
import torch


def frequent_tokens(targets: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` most frequent values (ties broken by the smaller id), most frequent first."""
    values, counts = torch.unique(targets, return_counts=True)
    order = sorted(range(len(values)), key=lambda i: (-int(counts[i]), int(values[i])))
    return values[order[:k]]


def bucket(targets: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Class of each target: its rank in ``kept``, or ``len(kept)`` ("other") when not kept."""
    classes = torch.full_like(targets, len(kept))
    for rank, token in enumerate(kept.tolist()):
        classes[targets == token] = rank
    return classes


def entropy_nats(counts: np.ndarray) -> np.ndarray:
    """Plug-in entropy (nats) of count vectors along the last axis (zero counts contribute 0)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(total > 0, counts / total, 0.0)
        terms = np.where(p > 0, -p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return np.asarray(terms.sum(-1))
