"""The public plugin API: everything a metric plugin may import from the core, in one module.

A plugin imports ``from tensorscope_core.plugin_api import ...`` and nothing else of the core
(its tests may also use ``tensorscope_core.testing`` and the user API of ``tensorscope_core``).
The core's internal modules may be renamed or split at any time; what is listed in ``__all__``
here changes only with ``PLUGIN_API_VERSION``, which a plugin module declares as
``TENSORSCOPE_PLUGIN_API`` and the core checks when it loads the plugin. First-party plugins are
held to this by an import-linter contract (``[tool.importlinter]`` in pyproject.toml).

What is here, by job:

- declaring a metric: ``Metric`` (per model), ``ModelSetMetric`` (over the models of a run),
  ``Params``, ``NoParams``, ``RunShape``, ``Step``, ``Cost``, ``Interpretation``;
- the values a metric returns: ``ScalarValue``, ``LayerValue``, ``HeadValue``, ``SeriesValue``,
  ``TableValue``, ``TensorValue``, ``TextValue``, ``MetricResult`` (read from needed metrics);
- artifacts: ``ArtifactSpec``, ``CaptureContext``, ``act_bytes`` (what a backward keeps),
  ``block_saved_bytes`` (what one block keeps, measured per architecture),
  ``forward_act_bytes`` (a forward's peak without autograd), ``kept_graph_bytes`` (a first-order graph
  kept for second-order products), ``first_tensor``; the value of the
  core's ``per_example_grads`` artifact, ``ExampleGrads``, its ``example_grads_layout`` and the
  seeded ``draw_labels`` it samples labels with;
- the model vocabulary: ``ModelView``, ``HeadWeights``, ``linear_out_in``, ``model_view``; ``ParameterEntries``
  and ``HeadEntries`` (which parameter entries a per-head view covers, also on a dispatched model);
- data: ``Batch``, ``PreparedData``, ``LossTargets``, ``tasks_skip_reason``;
- per-example stores: ``GradientStore`` (rows raw, int8-quantised or count-sketch projected,
  ``StoreBacking`` in memory or on disk), ``CountSketch``, ``row_squares``;
- memory ladders: ``Rung``, ``ASKED`` (see ``Metric.ladder``);
- functional helpers: ``batch_loss``, ``batch_logits``, ``hook_free_copy``, ``hook_free_view``,
  ``OneDeviceModel`` (the model as a function of the weights a metric differentiates, on one device, also
  when dispatched; ``offloaded_bytes`` what it loads; ``trainable_model`` of every trainable weight, which
  ``batch_loss`` / ``batch_logits`` take as ``model=`` to run on a dispatched model),
  ``per_example_grads``, ``per_example_calls``, ``sum_of_squares``, ``float64_sum_of_squares``, ``float64_dot``,
  ``atomic_write``; ``recorded_blocks`` and ``resumed_at`` (forwards that start at a block, for sweeps of
  interventions), ``stopped_before`` (forwards that end at a module, run only for what hooks capture);
- statistics: ``bootstrap_ci``, ``bootstrap_ratio_ci``, ``correlation``, ``fdr_bh``;
- errors: ``TensorScopeError``, ``BadParameterError``, ``DataError``, ``EmptyDataError``,
  ``UnsupportedModelError``;
- plugin registration: ``hookimpl``, ``PLUGIN_API_VERSION``;
- report sections: ``report_plots()`` returns the plotting helpers (needs the ``report`` extra);
- weight matching of MLP units between two models (Git Re-Basin): ``align``, ``aligned_bytes``,
  ``mlp_unit_axes``, ``match_units``, ``permute_units``, ``UnitAxis``.
"""

from __future__ import annotations

from types import ModuleType

from .artifacts import ArtifactSpec, act_bytes, forward_act_bytes, kept_graph_bytes
from .capture import CaptureContext, first_tensor
from .checkpoints import order_models, step_of
from .core_artifacts import LossTargets
from .data import Batch, PreparedData, tasks_skip_reason
from .errors import (
    BadParameterError,
    DataError,
    EmptyDataError,
    NotApplicable,
    TensorScopeError,
    UnsupportedModelError,
)
from .example_grads import ExampleGrads, draw_labels, example_grads_layout
from .example_store import Compression, CountSketch, GradientStore, StoreBacking, row_squares
from .functional import (
    OneDeviceModel,
    batch_logits,
    batch_loss,
    hook_free_copy,
    hook_free_view,
    offloaded_bytes,
    trainable_model,
)
from .hookspecs import PLUGIN_API_VERSION, hookimpl
from .metric import ASKED, Metric, ModelSetMetric, NoParams, Params, Rung, RunShape, Step
from .models.activations import block_saved_bytes
from .models.adapters.base import linear_out_in
from .models.load import model_view
from .models.resume import recorded_blocks, resumed_at, stopped_before
from .models.view import HeadEntries, HeadWeights, ModelView, ParameterEntries
from .numerics import float64_dot, float64_sum_of_squares, js_divergence_bits, sum_of_squares
from .per_example import per_example_calls, per_example_grads
from .results.analysis import Interpretation, ModelOrder
from .results.schema import (
    Cost,
    HeadValue,
    LayerValue,
    MetricResult,
    ScalarValue,
    SeriesValue,
    TableValue,
    TensorValue,
    TextValue,
)
from .results.store import atomic_write
from .stats import bootstrap_ci, bootstrap_ratio_ci, correlation, fdr_bh
from .weight_matching import UnitAxis, align, aligned_bytes, match_units, mlp_unit_axes, permute_units


def report_plots() -> ModuleType:
    """The report's plotting helpers (``heatmap``, ``line``, ``category_grid``, ...), for a plugin's
    report section; imported on use because they need matplotlib (the ``report`` extra)."""
    from .report import plots

    return plots


__all__ = [
    "ASKED",
    "PLUGIN_API_VERSION",
    "ArtifactSpec",
    "BadParameterError",
    "Batch",
    "CaptureContext",
    "Compression",
    "Cost",
    "CountSketch",
    "GradientStore",
    "Rung",
    "StoreBacking",
    "row_squares",
    "recorded_blocks",
    "resumed_at",
    "stopped_before",
    "DataError",
    "EmptyDataError",
    "ExampleGrads",
    "HeadValue",
    "HeadEntries",
    "HeadWeights",
    "Interpretation",
    "LayerValue",
    "LossTargets",
    "Metric",
    "ModelOrder",
    "MetricResult",
    "ModelSetMetric",
    "ModelView",
    "NoParams",
    "NotApplicable",
    "ParameterEntries",
    "Params",
    "PreparedData",
    "RunShape",
    "ScalarValue",
    "SeriesValue",
    "Step",
    "TableValue",
    "TensorScopeError",
    "TensorValue",
    "TextValue",
    "UnsupportedModelError",
    "act_bytes",
    "block_saved_bytes",
    "atomic_write",
    "batch_logits",
    "batch_loss",
    "bootstrap_ci",
    "bootstrap_ratio_ci",
    "correlation",
    "draw_labels",
    "example_grads_layout",
    "float64_dot",
    "float64_sum_of_squares",
    "forward_act_bytes",
    "kept_graph_bytes",
    "fdr_bh",
    "first_tensor",
    "hook_free_copy",
    "OneDeviceModel",
    "offloaded_bytes",
    "trainable_model",
    "hook_free_view",
    "hookimpl",
    "js_divergence_bits",
    "linear_out_in",
    "model_view",
    "order_models",
    "per_example_calls",
    "per_example_grads",
    "report_plots",
    "step_of",
    "sum_of_squares",
    "tasks_skip_reason",
    "UnitAxis",
    "align",
    "aligned_bytes",
    "match_units",
    "mlp_unit_axes",
    "permute_units",
]
