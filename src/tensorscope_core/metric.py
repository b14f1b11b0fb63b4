"""The metric declaration API: what a plugin writes to add a metric.

A metric is a class with declared facts (name, version, params, needs, cost) and an
update / finalize computation. The core instantiates it once per model (or once per
model set), feeds it every batch's artifacts and turns what ``finalize`` returns
into typed values. Nothing here knows any metric maths.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

from .core_artifacts import LossTargets, loss_targets
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
    """The run's dimensions that declared costs and pass counts may depend on.

    ``batches``: (rows, padded length, task) of each batch in data order (the last batch of a
    task may hold fewer rows than ``batch_size``); empty where the run has no data.

    ``dependency_params``: the parameters of the metrics this one reads (``metric_needs``) at the rungs
    the plan runs them, so a cost can follow a dependency stepped down its ladder (a mask per task
    only where the Fisher kept tasks). Empty where a cost is asked outside a plan: assume the
    dependencies' defaults.
    """

    batch_size: int
    seq_len: int
    n_batches: int
    n_sequences: int
    tasks: tuple[str, ...]
    seed: int
    batches: tuple[tuple[int, int, str | None], ...] = ()
    dependency_params: Mapping[str, Any] = field(default_factory=dict)

    def with_dependencies(self, params: Mapping[str, Any]) -> RunShape:
        """This shape as the metric reading ``params`` (metric -> its parameters) sees it."""
        return replace(self, dependency_params=dict(params)) if params else self


@dataclass(frozen=True)
class Rung:
    """One setting on a metric's memory ladder: its parameters and what they cost in accuracy.

    ``name`` is what a user pins (``--rung METRIC=NAME``) and what the result records;
    ``accuracy`` says, in words a reader of the plan understands, what is given up
    ("exact", "inner products within +-3% (k=4096 count sketch)", "first 64 examples").
    """

    name: str
    params: Any
    accuracy: str


#: the name of the top rung every ladder starts from: the parameters as the user gave them
ASKED = "asked"


@dataclass
class Step:
    """One batch as a metric sees it: the batch, the artifacts it asked for, and the loss targets.

    ``targets`` are the run's own (causal shift, or the seeded masked-LM masks): every metric
    sees the same ones as the shared forward, so none recomputes them with another seed.
    """

    batch: Batch
    artifacts: Mapping[str, Any]
    targets: LossTargets

    @property
    def target_mask(self) -> torch.Tensor:
        return self.targets.target_mask

    def __getitem__(self, name: str) -> Any:
        return self.artifacts[name]

    @property
    def task(self) -> str | None:
        return self.batch.task


Output = Mapping[str, Any]  # field -> Value | float | list | torch.Tensor


class MetricBase:
    """What every metric declares, per model or over a model set.

    Declare, as class attributes: ``name`` (namespaced, ``family.metric``), ``version`` (bump
    when values change), ``summary``, ``Params`` (a ``Params`` subclass), ``requires_metrics``
    (other metrics' results, by name, from any plugin), ``fields`` (field -> meaning) and
    ``derived_from`` (metrics whose values this one is computed from; recorded in each result,
    so correlation discovery never pairs a metric with its sources).
    Override ``cost`` to declare the bytes your state holds (checked against what the run
    measured) and ``interpret`` to flag hotspots and warnings in reports. Every attribute the
    metric sets is its state: the measured bytes count the tensors and arrays in it, through
    lists, tuples, dicts and plain objects at any depth, so nothing needs registering.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    summary: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    artifacts: ClassVar[tuple[str, ...]] = ()
    requires_metrics: ClassVar[tuple[str, ...]] = ()
    scope: ClassVar[Scope]
    fields: ClassVar[dict[str, str]] = {}
    #: metrics (or ``metric.field`` labels) this one is computed from; correlation
    #: discovery never pairs a metric with its sources
    derived_from: ClassVar[tuple[str, ...]] = ()
    #: runs on a model accelerate spread over devices or offloaded (``device_map``): set True only when
    #: the metric reads nothing but the shared pass's activations, logits and loss, or other results
    #: (an offloaded parameter has no storage and gets no gradient); the others end skipped there
    supports_dispatch: ClassVar[bool] = False

    _framework_attrs: ClassVar[frozenset[str]] = frozenset({"view", "params", "deps", "dep_tensors", "shape",
                                                            "base_name", "data"})

    def __init__(self, params: Any, shape: RunShape, dep_tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        self.params = params
        self.shape = shape
        #: the arrays of the needed results' ``TensorValue`` fields, by their key (read with ``tensor_of``)
        self.dep_tensors: Mapping[str, torch.Tensor] = dep_tensors or {}

    # -- to override ------------------------------------------------------------------
    def setup(self) -> None:
        """Create the state (called once, after the metric's inputs are set)."""

    @classmethod
    def cost(cls, params: Any, view: ModelView, shape: RunShape) -> Cost:
        """Declared bytes of state held across batches, and FLOPs (0 when negligible)."""
        return Cost()

    @classmethod
    def ladder(cls, params: Any, view: ModelView, shape: RunShape) -> Sequence[Rung]:
        """Cheaper settings than ``params``, most accurate first, each with its accuracy cost.

        When the run's plan does not fit its memory budget, the planner steps the metrics of the
        heaviest pass down their ladders (the largest saving of declared state first) before it
        skips any; the chosen rung is shown in the plan and recorded in the result. The rungs'
        ``cost`` must be smaller than ``params``' for the step to be taken. Default: none (the
        metric runs as asked or is skipped).
        """
        return ()

    @classmethod
    def cheaper_rungs(cls, params: Any, view: ModelView, shape: RunShape, candidates: Sequence[Rung]) -> list[Rung]:
        """The ``candidates`` (in order) whose declared memory (state, working memory, results) is smaller than
        the rung before them (the asked ``params`` first): a ladder's rungs must each save memory, and which
        do can depend on the model (a disk rung leaves nothing for a sketch to save)."""
        def held_by(p: Any) -> int:
            cost = cls.cost(p, view, shape)
            return cost.state_bytes + max(cost.transient_bytes, cost.finalize_bytes) + cost.result_bytes

        out: list[Rung] = []
        last = held_by(params)
        for rung in candidates:
            held = held_by(rung.params)
            if held < last:
                out.append(rung)
                last = held
        return out

    @classmethod
    def metric_needs(cls, params: Any) -> tuple[str, ...]:
        """The metrics this one needs with these parameters (default: ``requires_metrics``).

        Override when a parameter names another metric to read, e.g. a mask provider
        chosen by the user; the scheduler resolves, orders and passes what this returns.
        """
        return cls.requires_metrics

    @classmethod
    def interpret(cls, result: MetricResult) -> list[Interpretation]:
        """Readings of an ok result that the metric defines (hotspots, warnings); reports list them."""
        return []

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
        """Bytes the metric currently holds (the measured cost): every attribute's tensors and
        arrays, nested in containers at any depth."""
        from .capture import tensor_bytes

        return sum(_held_bytes(v, tensor_bytes) for k, v in vars(self).items() if k not in self._framework_attrs)

    @classmethod
    def class_path(cls) -> str:
        """``module:QualifiedName`` of the class, recorded in each result (provenance)."""
        return f"{cls.__module__}:{cls.__qualname__}"

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


def _held_bytes(value: Any, tensor_bytes: Any) -> int:
    """Bytes of tensors and numpy arrays in ``value``, through lists, tuples and dicts."""
    if isinstance(value, torch.Tensor):
        return int(tensor_bytes(value))
    if isinstance(value, dict):
        return sum(_held_bytes(v, tensor_bytes) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_held_bytes(v, tensor_bytes) for v in value)
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int) and not isinstance(value, type):
        return nbytes
    return int(tensor_bytes(value))


class Metric(MetricBase):
    """A per-model metric: it sees one model's view and that model's batches.

    Declare ``artifacts`` it reads per batch (besides what ``MetricBase`` lists); implement
    ``update(step)`` and ``finalize()``; override ``skip_reason`` when it does not apply to a
    model or its data. ``self.view`` is the model, ``self.deps`` the results of the metrics it
    needs on the same model.
    """

    scope: ClassVar[Scope] = "model"

    def __init__(self, params: Any, shape: RunShape, view: ModelView,
                 deps: Mapping[str, MetricResult] | None = None,
                 dep_tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        super().__init__(params, shape, dep_tensors)
        self.view = view
        self.deps: Mapping[str, MetricResult] = deps or {}
        self.setup()

    @classmethod
    def skip_reason(cls, params: Any, view: ModelView, data: PreparedData | None) -> str | None:
        """A reason when the metric does not apply to this model or data (-> skipped)."""
        return None

    @classmethod
    def artifact_requests(cls, params: Any, view: ModelView) -> dict[str, Mapping[str, Any]]:
        """What the metric asks of parameterised artifacts it reads: name -> request (e.g. the
        parameters or modules it needs). The scheduler merges the requests of one pass's
        consumers (their union) and the artifact serves the merged one; default: none."""
        return {}

    @classmethod
    def own_passes(cls, params: Any, view: ModelView, shape: RunShape) -> dict[str, int]:
        """The whole-model passes the metric makes itself on one model over the run, by kind
        (``replay_forward``, ``replay_backward``, ``sampled_backward``, ``per_example_backward``):
        every call of the model (or of a copy of it) outside the shared pass. The plan shows them,
        and the run counts the calls and records both; default: none."""
        return {}

    def update(self, step: Step) -> None:
        """Fold one batch into the state."""

    def finalize(self) -> Output:
        raise NotImplementedError(f"{self.name} does not implement finalize")

    @classmethod
    def pass_kinds(cls, artifact_pass: Mapping[str, str]) -> set[str]:
        return {artifact_pass[a] for a in cls.artifacts}


class ModelSetMetric(MetricBase):
    """A metric over all models of a run (checkpoints, fine-tunes and their base), computed once
    after every member's per-model metrics.

    Implement ``compute_set(views, results)``. ``self.base_name`` is the member that is the base
    model (None without a base), ``self.data`` each member's prepared data by model name when
    ``uses_data`` asks for it. ``needs_base``, ``min_models`` and ``set_skip_reason`` make it end
    ``skipped`` where it does not apply. Set ``reads_weights = False`` when ``compute_set`` reads only the
    members' results and metadata (names, configs, dims): when no model-set metric of a run reads
    weights, the members' weights are released after their own metrics (their views stay, on
    PyTorch's ``meta`` device) instead of staying loaded for this stage.
    """

    scope: ClassVar[Scope] = "model_set"
    #: skipped (with the fix) when the run has no base model
    needs_base: ClassVar[bool] = False
    #: skipped (with the fix) when the run has fewer models (the base included): 2 for a comparison
    min_models: ClassVar[int] = 1
    #: compute_set reads the members' parameter values; False: their results and metadata only
    reads_weights: ClassVar[bool] = True

    def __init__(self, params: Any, shape: RunShape, dep_tensors: Mapping[str, torch.Tensor] | None = None, *,
                 base_name: str | None = None, data: Mapping[str, PreparedData] | None = None) -> None:
        super().__init__(params, shape, dep_tensors)
        #: the name of the member that is the base model (None without a base)
        self.base_name = base_name
        #: each member's prepared data, by model name (when ``uses_data`` asked for it)
        self.data: Mapping[str, PreparedData] = data or {}
        self.setup()

    @classmethod
    def uses_data(cls, params: Any) -> bool:
        """Whether ``compute_set`` reads the run's batches (``self.data``), so the data is
        prepared even when no per-model metric reads it."""
        return False

    @classmethod
    def set_skip_reason(cls, params: Any, views: Mapping[str, ModelView], base_name: str | None) -> str | None:
        """A reason when the metric does not apply to this model set (-> skipped)."""
        return None

    @classmethod
    def own_passes(cls, params: Any, view: ModelView, shape: RunShape, members: Sequence[str],
                   base_name: str | None) -> dict[str, int]:
        """The whole-model passes ``compute_set`` makes over all ``members`` (names, the base
        included) together, by kind (see ``Metric.own_passes``); ``view`` is one member's,
        ``shape`` the run's, ``base_name`` the base member (None without one); default: none."""
        return {}

    def compute_set(self, views: Mapping[str, ModelView],
                    results: Mapping[str, Mapping[str, MetricResult]]) -> Output:
        """All members' views and their per-model results, by model name."""
        raise NotImplementedError(f"{self.name} does not implement compute_set")

    def loss_targets(self, view: ModelView, batch: Batch) -> LossTargets:
        """The run's loss targets of ``batch`` on ``view`` (the same masked-LM masks as the
        shared forward of that member saw)."""
        return loss_targets(view, batch, self.shape.seed)


#: a registered metric class: per model or over a model set
MetricClass = type[Metric] | type[ModelSetMetric]
