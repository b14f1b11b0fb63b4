"""The metric declaration API: what a plugin writes to add a metric.

A metric is a class with declared facts (name, version, params, needs, cost) and an
update / finalize computation. The core instantiates it once per model (or once per
model set), feeds it every batch's artifacts and turns what ``finalize`` returns
into typed values. Nothing here knows any metric maths.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

from .data import Batch, PreparedData
from .models.view import ModelView
from .results.schema import Cost, MetricResult, TensorValue

if TYPE_CHECKING:
    from .results.analysis import Interpretation

Scope = Literal["model", "model_set"]


class NoParams(BaseModel):
    """Parameters of a metric that takes none."""

    model_config = ConfigDict(extra="forbid")


class Params(BaseModel):
    """Base for metric parameters: unknown fields are refused (typos never pass silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class RunShape:
    """The run's dimensions that declared costs may depend on."""

    batch_size: int
    seq_len: int
    n_batches: int
    n_sequences: int
    tasks: tuple[str, ...]
    seed: int


@dataclass
class Step:
    """One batch as a metric sees it: the batch plus the artifacts it asked for."""

    batch: Batch
    artifacts: Mapping[str, Any]
    target_mask: torch.Tensor | None = None

    def __getitem__(self, name: str) -> Any:
        return self.artifacts[name]

    @property
    def task(self) -> str | None:
        return self.batch.task


Output = Mapping[str, Any]  # field -> Value | float | list | torch.Tensor


class Metric:
    """Base class of every metric.

    Declare, as class attributes: ``name`` (namespaced, ``family.metric``),
    ``version`` (bump when values change), ``summary``, ``Params`` (a ``Params``
    subclass), ``artifacts`` it reads per batch, ``requires_metrics`` (other metrics'
    results, by name, from any plugin), ``scope``, ``fields`` (field -> meaning) and
    ``derived_from`` (metrics whose values this one is computed from).
    Override ``cost`` to declare the bytes your state holds (checked against what
    the run measured), ``skip_reason`` when the metric does not apply and
    ``interpret`` to flag hotspots and warnings in reports.

    Per-model metrics implement ``update(step)`` and ``finalize()``; model-set
    metrics implement ``compute_set(views, results)``. ``tensor_of(result, field)`` reads
    the array behind a ``TensorValue`` of a result the metric needs.

    Model-set metrics also see ``self.base_name`` (the member that is the base model, or
    None when the run has no base) and ``self.data`` (each member's prepared data by model
    name, when ``uses_data`` asked for it); ``needs_base`` and ``set_skip_reason`` make them
    end ``skipped`` where they do not apply.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    summary: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    artifacts: ClassVar[tuple[str, ...]] = ()
    requires_metrics: ClassVar[tuple[str, ...]] = ()
    scope: ClassVar[Scope] = "model"
    fields: ClassVar[dict[str, str]] = {}
    #: metrics (or ``metric.field`` labels) this one is computed from; correlation
    #: discovery never pairs a metric with its sources
    derived_from: ClassVar[tuple[str, ...]] = ()
    #: model-set metrics only: skipped (with the fix) when the run has no base model
    needs_base: ClassVar[bool] = False

    _framework_attrs: ClassVar[frozenset[str]] = frozenset({"view", "params", "deps", "dep_tensors", "shape",
                                                            "views", "base_name", "data"})

    def __init__(self, params: Any, shape: RunShape, view: ModelView | None = None,
                 deps: Mapping[str, MetricResult] | None = None,
                 dep_tensors: Mapping[str, torch.Tensor] | None = None, *, base_name: str | None = None,
                 data: Mapping[str, PreparedData] | None = None) -> None:
        self.params = params
        self.shape = shape
        self.view = view
        self.deps: Mapping[str, MetricResult] = deps or {}
        #: the arrays of the needed results' ``TensorValue`` fields, by their key (read with ``tensor_of``)
        self.dep_tensors: Mapping[str, torch.Tensor] = dep_tensors or {}
        #: model-set metrics: the name of the member that is the base model (None without a base)
        self.base_name = base_name
        #: model-set metrics that ``uses_data``: each member's prepared data, by model name
        self.data: Mapping[str, PreparedData] = data or {}
        self.setup()

    # -- to override ------------------------------------------------------------------
    def setup(self) -> None:
        """Create the state tensors (called once, after params/view/deps are set)."""

    @classmethod
    def cost(cls, params: Any, view: ModelView, shape: RunShape) -> Cost:
        """Declared bytes of state held across batches, and FLOPs (0 when negligible)."""
        return Cost()

    @classmethod
    def metric_needs(cls, params: Any) -> tuple[str, ...]:
        """The metrics this one needs with these parameters (default: ``requires_metrics``).

        Override when a parameter names another metric to read, e.g. a mask provider
        chosen by the user; the scheduler resolves, orders and passes what this returns.
        """
        return cls.requires_metrics

    @classmethod
    def skip_reason(cls, params: Any, view: ModelView, data: PreparedData | None) -> str | None:
        """A reason when the metric does not apply to this model or data (-> skipped)."""
        return None

    @classmethod
    def uses_data(cls, params: Any) -> bool:
        """Model-set metrics: whether ``compute_set`` reads the run's batches (``self.data``), so
        the data is prepared even when no per-model metric reads it."""
        return False

    @classmethod
    def set_skip_reason(cls, params: Any, views: Mapping[str, ModelView], base_name: str | None) -> str | None:
        """Model-set metrics: a reason when the metric does not apply to this model set (-> skipped)."""
        return None

    @classmethod
    def interpret(cls, result: MetricResult) -> list[Interpretation]:
        """Readings of an ok result that the metric defines (hotspots, warnings); reports list them."""
        return []

    def update(self, step: Step) -> None:
        """Fold one batch into the state."""

    def finalize(self) -> Output:
        raise NotImplementedError(f"{self.name} implements neither finalize nor compute_set")

    def compute_set(self, views: Mapping[str, ModelView],
                    results: Mapping[str, Mapping[str, MetricResult]]) -> Output:
        """Model-set metrics: all models' views and their per-model results by model name."""
        raise NotImplementedError(f"{self.name} declares scope 'model_set' but has no compute_set")

    # -- for the metric's own use ------------------------------------------------------
    def tensor_of(self, result: MetricResult, field: str) -> torch.Tensor:
        """The array behind ``result``'s ``TensorValue`` field ``field``.

        ``result`` is one the metric needs: an entry of ``self.deps`` or, in ``compute_set``,
        a per-model result of a metric in ``metric_needs``. Raises KeyError otherwise, or
        when the field is not a tensor.
        """
        value = result.values.get(field)
        if not isinstance(value, TensorValue):
            tensors = sorted(k for k, v in result.values.items() if isinstance(v, TensorValue))
            raise KeyError(f"{result.metric} has no tensor field '{field}' (tensor fields: {tensors or 'none'})")
        try:
            return self.dep_tensors[value.key]
        except KeyError:
            raise KeyError(f"the tensor '{value.key}' was not passed to {self.name}: a metric reads the tensors "
                           "of the metrics it needs (metric_needs) only") from None

    # -- used by the core -------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes of tensors/arrays the metric currently holds (the measured cost)."""
        from .capture import tensor_bytes

        return sum(tensor_bytes(v) + int(getattr(v, "nbytes", 0) if not isinstance(v, torch.Tensor) else 0)
                   for k, v in vars(self).items() if k not in self._framework_attrs)

    @classmethod
    def pass_kinds(cls, artifact_pass: Mapping[str, str]) -> set[str]:
        return {artifact_pass[a] for a in cls.artifacts}

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """The catalogue entry (CLI ``metrics``/``explain`` and docs/ are generated from it)."""
        schema = cls.Params.model_json_schema()
        return {
            "name": cls.name, "version": cls.version, "summary": cls.summary, "scope": cls.scope,
            "artifacts": list(cls.artifacts), "requires_metrics": list(cls.requires_metrics),
            "fields": dict(cls.fields), "doc": inspect.cleandoc(cls.__doc__ or ""),
            "params": {k: {"type": v.get("type", v.get("anyOf", "")), "default": v.get("default"),
                           "description": v.get("description", "")}
                       for k, v in schema.get("properties", {}).items()},
        }
