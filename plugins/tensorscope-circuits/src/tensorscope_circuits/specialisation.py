"""circuits.head_specialisation: per-head profiles and groups of heads with similar profiles."""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from scipy.cluster.hierarchy import fcluster, linkage

from tensorscope_core.plugin_api import Cost, HeadValue, Metric, ModelView, Params, RunShape, TableValue, TextValue

Feature = Literal["previous_token", "duplicate_token", "induction", "entropy", "copying"]
#: feature -> (metric, field); every field is a layer x head grid with values in [0, 1]
SOURCES: dict[str, tuple[str, str]] = {
    "previous_token": ("circuits.head_scores", "previous_token"),
    "duplicate_token": ("circuits.head_scores", "duplicate_token"),
    "induction": ("circuits.head_scores", "induction"),
    "entropy": ("circuits.attention_entropy", "normalised"),
    "copying": ("circuits.qkov", "copying_positive"),
}


def group_profiles(profiles: np.ndarray, cut: float) -> np.ndarray:
    """Group labels 0, 1, ... (numbered in order of first appearance) of the rows of ``profiles``
    [n, F]: average-linkage (UPGMA) hierarchical clustering with the distance
    d(a, b) = ||a - b||_2 / sqrt(F) (the root-mean-square feature difference), cut where the
    merge distance exceeds ``cut``: two groups stay apart when their mean pairwise distance is > cut."""
    n, n_features = profiles.shape
    if n == 1:
        return np.zeros(1, dtype=int)
    tree = linkage(profiles / math.sqrt(n_features), method="average", metric="euclidean")
    raw = fcluster(tree, t=cut, criterion="distance")
    order = {c: i for i, c in enumerate(dict.fromkeys(raw.tolist()))}
    return np.array([order[c] for c in raw.tolist()])


class SpecialisationParams(Params):
    features: tuple[Feature, ...] = Field(("previous_token", "duplicate_token", "induction", "entropy", "copying"),
                                          description="profile entries (each a per-head value in [0, 1])")
    cut: float = Field(0.25, gt=0, description="groups whose mean RMS profile distance exceeds this stay apart")


class HeadSpecialisation(Metric):
    """Each head's profile is a vector of per-head values in [0, 1], read from other metrics:
    ``previous_token``, ``duplicate_token``, ``induction`` (circuits.head_scores), ``entropy``
    (circuits.attention_entropy's normalised entropy, on the run's data) and ``copying``
    (circuits.qkov's positive-real eigenvalue fraction of the full OV circuit). Heads are grouped
    by average-linkage hierarchical clustering (scipy) with the distance
    d(a, b) = ||a - b||_2 / sqrt(F), the root-mean-square difference over the F features, cut at
    ``cut``: heads in one group have a mean pairwise distance <= cut. A missing value (a score
    whose counted attention was all on the excluded BOS) counts as 0. A feature a model does not
    have (induction on an encoder, copying without an unembedding) is left out, and ``notes``
    says so. Each group is labelled by the features whose group mean is >= 0.5.
    """

    name = "circuits.head_specialisation"
    supports_dispatch = True  # reads its three metrics' results only
    version = "1"
    summary = "per-head profiles (scores, entropy, copying) grouped by hierarchical clustering"
    Params = SpecialisationParams
    requires_metrics = ("circuits.head_scores", "circuits.attention_entropy", "circuits.qkov")  # default features
    derived_from = requires_metrics
    fields = {
        "profile": "[L, H, F] tensor: each head's feature values, in the order of 'features'",
        "features": "the features used, in profile order",
        "group": "layer x head group index",
        "groups": "table: group, n_heads, label, mean of each feature, members (layer.head)",
        "n_groups": "number of groups",
        "notes": "features left out and why",
    }

    @classmethod
    def metric_needs(cls, params: SpecialisationParams) -> tuple[str, ...]:
        return tuple(dict.fromkeys(SOURCES[f][0] for f in params.features))

    @classmethod
    def cost(cls, params: SpecialisationParams, view: ModelView, shape: RunShape) -> Cost:
        n = view.n_layers * view.n_heads
        return Cost(state_bytes=0, flops=float(n * n * len(params.features)))

    def finalize(self) -> dict[str, Any]:
        used, columns, notes = [], [], []
        for feature in dict.fromkeys(self.params.features):
            metric, field = SOURCES[feature]
            value = self.deps[metric].values.get(field)
            if not isinstance(value, HeadValue):
                notes.append(f"{feature} left out: {metric} has no '{field}' for this model")
                continue
            used.append(feature)
            columns.append(np.array([[np.nan if v is None else v for v in row] for row in value.values], dtype=float))
        if not used:
            raise ValueError(f"none of the features {list(self.params.features)} is available: {'; '.join(notes)}")
        grid = np.nan_to_num(np.stack(columns, axis=-1))  # [L, H, F]
        flat = grid.reshape(-1, len(used))
        labels = group_profiles(flat, self.params.cut)
        n_heads = self.view.n_heads
        rows = []
        for g in range(int(labels.max()) + 1):
            members = np.flatnonzero(labels == g)
            mean = flat[members].mean(axis=0)
            label = "+".join(f for f, m in zip(used, mean, strict=True) if m >= 0.5) or "none"
            rows.append([g, len(members), label, *map(float, mean),
                         " ".join(f"{i // n_heads}.{i % n_heads}" for i in members)])
        return {"profile": torch.from_numpy(grid), "features": TextValue(text=", ".join(used)),
                "group": HeadValue(values=labels.reshape(grid.shape[:2]).tolist()),
                "groups": TableValue(columns=["group", "n_heads", "label", *used, "members"], rows=rows),
                "n_groups": float(labels.max() + 1), "notes": TextValue(text="; ".join(notes) or "none")}
