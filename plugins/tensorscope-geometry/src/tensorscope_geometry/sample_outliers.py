"""geometry.sample_outliers: examples that lie far from the others in the final representation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    Interpretation,
    Metric,
    MetricResult,
    ModelView,
    NotApplicable,
    Params,
    PreparedData,
    RunShape,
    ScalarValue,
    Step,
    TableValue,
    TextValue,
)

from .outliers import Distance, Pooling, kth_neighbour_distance, pool, robust_z


class OutlierParams(Params):
    pooling: Pooling = Field("mean", description="'mean': mean over the sequence's real tokens; 'last': its last "
                                                 "real token")
    include_first: bool = Field(False, description="with pooling='mean', count position 0 too (left out by default: "
                                                   "the first token's state is an attention sink, large and alike "
                                                   "across sequences)")
    layer: int | None = Field(None, ge=0, description="resid entry to read (0: embeddings .. n_layers); None: "
                                                      "n_layers, the last block's output before the final norm")
    k: int = Field(5, ge=1, description="the distance to the k-th nearest other example is the score")
    metric: Distance = Field("euclidean", description="'euclidean' or 'cosine' (1 - cos)")
    threshold: float = Field(3.5, gt=0, description="examples with robust z above this are listed as outliers")


def _n_examples(data: PreparedData) -> int:
    return sum(rows for rows, _, _ in data.batch_layout())


class SampleOutliers(Metric):
    """Per example (sequence) of the run, in data order: its representation r_i, the residual stream
    at entry ``layer`` (default n_layers: the last block's output, before the final norm) pooled over
    the sequence (``pooling='mean'``: its real tokens from position 1, a one-token sequence keeps its
    token; ``'last'``: its last real token; masked LMs: on the core's masked input); d_i, the distance
    from r_i to its k-th nearest neighbour among the other examples (scikit-learn ``NearestNeighbors``,
    exact, euclidean or cosine = 1 - cos); and the robust z-score z_i = (d_i - median d) / (1.4826 MAD)
    with MAD the median of |d_i - median d|. Where more than half the distances tie (MAD = 0) the scale
    is 1.253314 x the mean of |d_i - median d| instead, and ``notes`` says so. A large z_i marks an
    example unlike the others (mislabelled, corrupted, off-distribution): the per-example d_i and z_i
    are the ``samples`` of ``distance`` and ``robust_z``, to compare with per-example values of other
    metrics (``gradients.tracin`` self-influence). Reads the shared pass's ``resid`` (no pass of its own).
    """

    name = "geometry.sample_outliers"
    supports_dispatch = True  # reads the shared pass's residual stream only
    version = "1"
    summary = "per example: distance to its k-th neighbour in the final representation and a robust z-score"
    Params = OutlierParams
    artifacts = ("resid",)
    fields = {
        "distance": "median over examples of d_i, the k-th neighbour distance; samples: d_i in data order",
        "robust_z": "largest z_i = (d_i - median) / (1.4826 MAD); samples: z_i in data order",
        "mad": "median absolute deviation of d_i from its median",
        "n_outliers": "examples with z_i > threshold",
        "outliers": "table of those examples, highest z first: index (data order), task, distance, robust_z",
        "notes": "the representation, distance and scale estimator used",
    }

    @classmethod
    def skip_reason(cls, params: OutlierParams, view: ModelView, data: PreparedData | None) -> str | None:
        if params.layer is not None and params.layer > view.n_layers:
            return f"layer {params.layer} is out of range: {view.name} has resid entries 0..{view.n_layers}"
        if data is not None and _n_examples(data) <= params.k:
            return (f"{_n_examples(data)} examples: the k-th neighbour (k={params.k}) of each needs at least "
                    f"{params.k + 1}; pass more sequences or lower k")
        return None

    @classmethod
    def cost(cls, params: OutlierParams, view: ModelView, shape: RunShape) -> Cost:
        n = shape.n_sequences
        return Cost(state_bytes=8 * n * view.d_model, flops=2.0 * n * n * view.d_model)

    def setup(self) -> None:
        self.points = torch.zeros(self.shape.n_sequences, self.view.d_model, dtype=torch.float64)
        self.tasks: list[str | None] = []
        self.filled = 0

    def update(self, step: Step) -> None:
        layer = self.view.n_layers if self.params.layer is None else self.params.layer
        pooled = pool(step["resid"][layer], step.batch.attention_mask, self.params.pooling, self.params.include_first)
        rows = pooled.shape[0]
        self.points[self.filled:self.filled + rows] = pooled.cpu()
        self.tasks += [step.task] * rows
        self.filled += rows

    def finalize(self) -> dict[str, Any]:
        p: OutlierParams = self.params
        if self.filled <= p.k:
            raise NotApplicable(f"{self.filled} examples: the k-th neighbour (k={p.k}) needs at least {p.k + 1}",
                                "pass more sequences or lower k")
        points = self.points[:self.filled].numpy()
        if p.metric == "cosine" and not np.linalg.norm(points, axis=1).all():
            raise NotApplicable("an example's representation is the zero vector: its cosine distance is undefined",
                                "use metric='euclidean'")
        distance = kth_neighbour_distance(points, p.k, p.metric)
        scored = robust_z(distance)
        flagged = np.flatnonzero(scored.z > p.threshold)
        rows = [[int(i), self.tasks[i], float(distance[i]), float(scored.z[i])]
                for i in flagged[np.argsort(-scored.z[flagged], kind="stable")]]
        layer = self.view.n_layers if p.layer is None else p.layer
        pooled = ("the last real token" if p.pooling == "last"
                  else "the mean over real tokens" + ("" if p.include_first else " from position 1"))
        n = self.filled
        return {
            "distance": ScalarValue(value=scored.median, n=n, samples=distance.tolist()),
            "robust_z": ScalarValue(value=float(scored.z.max()), n=n, samples=scored.z.tolist()),
            "mad": ScalarValue(value=scored.mad, n=n),
            "n_outliers": ScalarValue(value=len(rows), n=n),
            "outliers": TableValue(columns=["index", "task", "distance", "robust_z"], rows=rows),
            "notes": TextValue(text=f"resid[{layer}], {pooled}; {p.metric} distance to the k-th neighbour "
                                    f"(k={p.k}) of {n} examples; z scale: {scored.estimator}"),
        }

    @classmethod
    def interpret(cls, result: MetricResult) -> list[Interpretation]:
        rows = result.values["outliers"].rows  # type: ignore[union-attr]
        return [Interpretation(level="warning", text=f"example {index} lies far from the others (robust z {z:.1f})",
                               where=f"example {index}" + (f" ({task})" if task else ""))
                for index, task, _, z in rows[:5]]
