"""Per-example gradients from the core's ``per_example_grads`` artifact, as this plugin's metrics use them.

The core computes, once per micro-batch for every consumer of the pass, the gradient of each
example's *summed* token NLL (the run's ``LossTargets``: next tokens of a causal model, the seeded
masked positions of a masked-LM encoder), with the observed labels, on the union of the
parameters its consumers ask for (``artifact_requests``). This plugin's metrics use the gradient of
each example's *mean* token loss,

    l_i(theta) = sum_t m_it * CE(logits_it, y_it) / max(1, sum_t m_it),

so the core's batch-mean ``param_grad`` equals sum_i T_i g_i / sum_i T_i with T_i the example's
number of targets; an example without targets has loss 0 and a zero gradient. ``mean_loss_rows``
picks a metric's entries out of the artifact's vectors first and divides those by T_i after
(cheaper than dividing every column). Consumers must not modify the tensors in place (the
plugin's stores keep them uncopied).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tensorscope_core.plugin_api import ExampleGrads, ModelView, row_squares

from .projection import Projection
from .selection import Layout, Subset, SubsetParams, layout_of, select_parameters

ARTIFACT = "per_example_grads"


def per_example_request(params: SubsetParams, view: ModelView,
                        sketch: int | None = None) -> dict[str, Mapping[str, Any]]:
    """``artifact_requests`` of a metric on a parameter subset: the observed-label gradients of the
    parameters its ``parameters`` / ``layers`` select (known before any mask is read); with ``sketch``
    (``sketch_dim``) only their count sketch to that many dimensions and their squared norms."""
    request: dict[str, Any] = {"parameters": select_parameters(view, params.parameters, params.layers),
                               "labels": ("observed",)}
    if sketch is not None:
        request["sketch"] = sketch
    return {ARTIFACT: request}


def sketch_dim(params: SubsetParams, projection_dim: int | None) -> int | None:
    """The sketch a projecting metric asks the artifact for: its ``projection_dim``, unless a
    ``mask_metric`` picks its entries (known only once that metric has run: the artifact then makes the
    gradients, and the metric sketches the masked entries itself)."""
    return projection_dim if params.mask_metric is None else None


def projected_rows(view: ModelView, chosen: Subset, grads: ExampleGrads, layouts: dict[tuple[str, ...], Layout],
                   projection: Projection, parameters: Sequence[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the mean-loss gradients' sketch [batch, k], their exact squared norms [batch]), float64: the
    artifact's sketch of the summed-loss gradients (asked for as ``{"parameters": parameters, "sketch":
    k}``) divided by each example's target count, or, where the artifact made the gradients instead,
    ``projection`` of ``mean_loss_rows``. Either way ``projection`` records its error."""
    sketched = grads.sketched(parameters, projection.sketch.k)
    if sketched is None:
        rows = mean_loss_rows(view, chosen, grads, layouts)
        squares = row_squares(rows.cpu())
        return projection(rows, squares), squares
    per = grads.n_targets.clamp(min=1).double()
    squares = sketched[1] / per.square()
    return projection.measured(sketched[0] / per[:, None], squares), squares


def mean_loss_rows(view: ModelView, chosen: Subset, grads: ExampleGrads,
                   layouts: dict[tuple[str, ...], Layout]) -> torch.Tensor:
    """The gradients [batch, kept] of each example's mean token loss on ``chosen``'s entries (its
    parameters, and with masks their kept entries), in the model's dtype and on its device.
    ``layouts`` caches the plugin's ``Layout`` of the artifact's parameters (one per merged request)."""
    key = tuple(grads.layout)
    layout = layouts.get(key)
    if layout is None:
        layout = layouts[key] = layout_of(view, list(key))
    flat = grads.of("observed")
    columns = chosen.columns(layout)
    rows = flat if columns is None else flat[:, columns.to(flat.device)]
    return rows / grads.n_targets.clamp(min=1).to(device=rows.device, dtype=rows.dtype)[:, None]
