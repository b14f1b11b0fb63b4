"""TensorScope core: many analysis metrics of a model in one shared run.

Public API: ``analyze`` (alias ``analyze_models``), ``plan``, ``RunConfig``, ``Results``,
``track`` (a training-loop callback that logs to experiment trackers) and the value types;
``UnifiedModelAnalyzer`` / ``UnifiedConfig`` are familiar aliases over ``Analyzer`` / ``RunConfig``
(family flags, flat metric names). Plugin authors import from ``tensorscope_core.plugin_api`` (the versioned
plugin API); ``Metric``, ``ModelSetMetric``, ``Params`` and the like are also here for notebooks.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("tensorscope")
except _metadata.PackageNotFoundError:  # running from a source tree without install
    __version__ = "0+unknown"

from .api import Analyzer, analyze, analyze_models, plan
from .artifacts import ArtifactSpec
from .config import RunConfig
from .data import Batch, builtin_corpus
from .hookspecs import PLUGIN_API_VERSION, hookimpl
from .metric import Metric, ModelSetMetric, NoParams, Params, RunShape, Step
from .models.adapters import GenericAdapter
from .models.load import ModelSource
from .models.view import HeadWeights, ModelView
from .results import Results
from .results.analysis import Interpretation
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
from .trackers.callback import Tracker, track
from .unified import UnifiedConfig, UnifiedModelAnalyzer

__all__ = [
    "PLUGIN_API_VERSION",
    "__version__",
    "Analyzer",
    "ArtifactSpec",
    "Batch",
    "Cost",
    "GenericAdapter",
    "HeadValue",
    "HeadWeights",
    "Interpretation",
    "LayerValue",
    "Metric",
    "MetricResult",
    "ModelSetMetric",
    "ModelSource",
    "ModelView",
    "NoParams",
    "Params",
    "Results",
    "RunConfig",
    "RunShape",
    "ScalarValue",
    "SeriesValue",
    "Step",
    "TableValue",
    "TensorValue",
    "TextValue",
    "Tracker",
    "UnifiedConfig",
    "UnifiedModelAnalyzer",
    "analyze",
    "analyze_models",
    "builtin_corpus",
    "hookimpl",
    "plan",
    "track",
]
