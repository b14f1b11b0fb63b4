"""dynamics.representation_drift: 1 - linear CKA per layer between consecutive checkpoints."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tensorscope_core.plugin_api import (
    Cost,
    LayerValue,
    MetricResult,
    ModelSetMetric,
    ModelView,
    RunShape,
    ScalarValue,
    TableValue,
)

from .checkpoints import SeriesParams, order_checkpoints

TERMS = "geometry.similarity_terms"


def same_layer_cka(grams_a: torch.Tensor, grams_b: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Minibatch linear CKA of layer l of A with layer l of B [L]: sum_b <K_b, L_b> / sqrt(sum_b |K_b|^2
    sum_b |L_b|^2) over the already-centred Grams [B, L, m, m] (NaN where a side is constant)."""
    cross = torch.zeros(grams_a.shape[1], dtype=torch.float64)
    self_a, self_b = torch.zeros_like(cross), torch.zeros_like(cross)
    for b, n in enumerate(sizes):
        ka, kb = grams_a[b, :, :n, :n], grams_b[b, :, :n, :n]
        cross += (ka * kb).sum((-2, -1))
        self_a += ka.square().sum((-2, -1))
        self_b += kb.square().sum((-2, -1))
    denom = (self_a * self_b).sqrt()
    return torch.where(denom > 0, cross / denom.clamp_min(1e-300), torch.full_like(cross, float("nan")))


class RepresentationDrift(ModelSetMetric):
    """1 - linear CKA (Kornblith et al. 2019) between the same residual-stream entry (``resid``,
    n_layers + 1 entries) of consecutive checkpoints (in step order), or of every fine-tune and
    its base when the run has a base, on the same examples. CKA is Nguyen et al.'s minibatch
    estimator over the centred Gram matrices of ``geometry.similarity_terms`` (whose
    ``unit`` and ``examples_per_batch`` parameters choose the examples); the run checks that
    both models hold the same examples. 0 for identical models; NaN where a layer is constant.
    """

    name = "dynamics.representation_drift"
    min_models = 2  # a comparison: the core skips a smaller set with the fix
    version = "1"
    summary = "1 - linear CKA per layer between consecutive checkpoints (or each model and its base)"
    Params = SeriesParams
    requires_metrics = (TERMS,)
    derived_from = (TERMS,)
    reads_weights = False
    fields = {
        "drift": "[n_pairs, n_layers + 1] 1 - CKA of each pair, per resid entry",
        "pairs": "table model_a, model_b, layer, drift",
        "last": "drift of the last pair, per resid entry",
        "max_drift": "largest drift over pairs and layers",
    }

    @classmethod
    def cost(cls, params: Any, view: ModelView, shape: RunShape) -> Cost:
        return Cost(state_bytes=0)


    def _pairs(self, names: list[str]) -> list[tuple[str, str]]:
        ordered = order_checkpoints(names, self.params.steps).names
        if self.base_name is not None:
            return [(self.base_name, n) for n in ordered if n != self.base_name]
        return list(zip(ordered, ordered[1:], strict=False))

    def compute_set(
        self, views: Mapping[str, ModelView], results: Mapping[str, Mapping[str, MetricResult]]
    ) -> dict[str, Any]:
        rows: list[list[Any]] = []
        drifts = []
        for a, b in self._pairs(list(views)):
            ra, rb = results[a][TERMS], results[b][TERMS]
            sizes = [int(n) for n in ra.value("sizes")]
            if sizes != [int(n) for n in rb.value("sizes")] or not torch.equal(
                self.tensor_of(ra, "examples"), self.tensor_of(rb, "examples")
            ):
                raise ValueError(
                    f"{a} and {b} saw different examples in {TERMS}: run them in one analyze() call on "
                    "the same data (for different tokenizers use unit='sequence')"
                )
            grams_a, grams_b = self.tensor_of(ra, "grams"), self.tensor_of(rb, "grams")
            if grams_a.shape[1] != grams_b.shape[1]:
                raise ValueError(f"{a} and {b} have different depths: drift compares the same layer")
            drift = 1.0 - same_layer_cka(grams_a, grams_b, sizes)
            drifts.append(drift)
            rows += [[a, b, layer, float(d)] for layer, d in enumerate(drift)]
        stacked = torch.stack(drifts)
        return {
            "drift": stacked,
            "pairs": TableValue(columns=["model_a", "model_b", "layer", "drift"], rows=rows),
            "last": LayerValue(values=drifts[-1].tolist(), axis="resid"),
            "max_drift": ScalarValue(value=float(stacked.nan_to_num(nan=float("-inf")).max())),
        }
