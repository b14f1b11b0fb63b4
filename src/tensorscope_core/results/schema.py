"""The typed, versioned result schema (JSON Schema published in docs/result-schema.json)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "1.4"  # 1.1: ScalarValue.samples; 1.2: LayerValue.axis, MetricResult provenance; 1.3: rung;
# 1.4: ModelRecord.source (all additive)

Float = float | None  # NaN and infinities are written as null


class _Value(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="null")


class ScalarValue(_Value):
    """One number, with a confidence interval and sample size where it averages examples.

    ``samples`` optionally keeps the per-example (or per-batch) values the number
    summarises, in data order: comparisons across models test differences on them
    (paired when the models saw the same data).
    """

    kind: Literal["scalar"] = "scalar"
    value: Float
    ci_low: Float = None
    ci_high: Float = None
    n: int | None = None
    unit: str | None = None
    samples: list[Float] | None = None


#: what the entries of a per-layer value are: ``block`` (one per transformer block, 0..n-1),
#: ``resid`` (the residual stream, 0 = the embeddings .. n = after the last block) or
#: ``labelled`` (named entries, e.g. parameter groups, joined across metrics by label)
LayerAxis = Literal["block", "resid", "labelled"]


class LayerValue(_Value):
    """One number per layer, on a stated axis (correlation discovery joins equal axes only).

    On the ``block`` and ``resid`` axes ``labels``, when given, are the entries' positions on
    the axis (``"0"``, ``"3"``: a subset of the blocks); on ``labelled`` they name the entries.
    ``axis`` None (results written before schema 1.2): ``labelled`` with labels, else ``block``.
    """

    kind: Literal["per_layer"] = "per_layer"
    values: list[Float]
    labels: list[str] | None = None
    axis: LayerAxis | None = None

    @property
    def on_axis(self) -> LayerAxis:
        """The axis the entries live on (``axis``, or what results before 1.2 meant)."""
        if self.axis is not None:
            return self.axis
        return "labelled" if self.labels else "block"

    def keys(self) -> list[str]:
        """Each entry's key on its axis: the label where given, else the position."""
        return list(self.labels) if self.labels else [str(i) for i in range(len(self.values))]


class HeadValue(_Value):
    """A layer x head grid."""

    kind: Literal["per_head"] = "per_head"
    values: list[list[Float]]


class SeriesValue(_Value):
    """An ordered series (a spectrum, a trajectory) with the name of its index."""

    kind: Literal["series"] = "series"
    values: list[Float]
    index_name: str = "index"


class TensorValue(_Value):
    """A large array kept in tensors.safetensors beside the JSON, under ``key``."""

    kind: Literal["tensor"] = "tensor"
    key: str
    shape: list[int]
    dtype: str


class TableValue(_Value):
    kind: Literal["table"] = "table"
    columns: list[str]
    rows: list[list[Any]]


class TextValue(_Value):
    kind: Literal["text"] = "text"
    text: str


Value = Annotated[ScalarValue | LayerValue | HeadValue | SeriesValue | TensorValue | TableValue | TextValue,
                  Field(discriminator="kind")]

Status = Literal["ok", "error", "skipped"]


class Cost(BaseModel):
    """Declared cost of one metric on one model: bytes of state it holds, and FLOPs."""

    model_config = ConfigDict(extra="forbid")

    state_bytes: int = 0
    #: working memory the metric's update and finalize allocate on top of its state and free again
    #: (e.g. a float64 copy of the largest weight); the plan adds the largest of a pass's to its peak
    transient_bytes: int = 0
    #: working memory only its finalize allocates (e.g. the result fields it builds), after the pass's
    #: artifacts are freed: the plan counts it beside the state and the results kept, not the artifacts
    finalize_bytes: int = 0
    #: bytes of the tensors among its results (masks, per-parameter fields, views of its state included),
    #: which the run keeps to its end: the plan holds them through every later pass (what finalize newly
    #: allocates for them, beside the state, belongs in ``finalize_bytes``)
    result_bytes: int = 0
    flops: float = 0.0


class RungRecord(BaseModel):
    """The memory-ladder rung a metric ran at (its ``params`` are that rung's), and why."""

    model_config = ConfigDict(extra="forbid")

    name: str
    accuracy: str
    #: "budget": the planner stepped down to fit the memory budget; "pinned": the user chose it
    chosen_by: Literal["budget", "pinned"]


class MetricResult(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="null")

    metric: str
    version: str
    plugin: str
    status: Status
    params: dict[str, Any] = Field(default_factory=dict)
    values: dict[str, Value] = Field(default_factory=dict)
    reason: str | None = None
    error_type: str | None = None
    declared_bytes: int | None = None
    measured_bytes: int | None = None
    seconds: float | None = None
    from_cache: bool = False
    #: provenance, recorded by the core so reports never consult the installed plugins:
    #: ``module:Class`` of the metric, and the metrics (or ``metric.field`` labels) it derives from
    class_path: str | None = None
    derived_from: list[str] = Field(default_factory=list)
    #: the whole-model passes the metric declared for itself (kind -> count), and the calls of the
    #: model the run counted while the metric ran (equal when the declaration is true)
    passes_declared: dict[str, int] = Field(default_factory=dict)
    model_calls: int | None = None
    #: the ladder rung the metric ran at; None: as asked (see ``Metric.ladder``)
    rung: RungRecord | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def value(self, field: str | None = None) -> Any:
        """The plain number/list of ``field`` (the only field when there is one)."""
        if field is None:
            if len(self.values) != 1:
                raise KeyError(f"{self.metric} has fields {sorted(self.values)}: name one")
            field = next(iter(self.values))
        v = self.values[field]
        return getattr(v, "value", None) if isinstance(v, ScalarValue) else getattr(v, "values", v)


class PluginRecord(BaseModel):
    name: str
    version: str | None = None
    status: Literal["ok", "broken"] = "ok"
    error: str | None = None
    metrics: list[str] = Field(default_factory=list)


class ArtifactBytes(BaseModel):
    """One artifact's bytes for its largest batch: what its declaration said, what it held."""

    model_config = ConfigDict(extra="forbid")

    declared: int
    held: int


class ModelRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: the short name results, tables and reports use (the fewest trailing path parts that tell the
    #: run's models apart, or the name the user gave)
    name: str
    #: the path the model was read from, as given (a module passed in: None)
    source: str | None = None
    family: str
    fingerprint: str
    dims: dict[str, int]
    data_fingerprint: str | None = None
    n_sequences: int = 0
    n_tokens: int = 0
    #: passes by kind: the shared ones (weights, forward, backward: one per batch and stage) and
    #: the whole-model passes metrics and artifacts declared for themselves
    passes: dict[str, int] = Field(default_factory=dict)
    #: calls of the model the run counted, by who made them (``shared``, ``artifact:NAME``, a metric)
    model_calls: dict[str, int] = Field(default_factory=dict)
    #: per artifact of the shared passes: declared vs held bytes of one batch (the largest)
    artifact_bytes: dict[str, ArtifactBytes] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    metrics: dict[str, MetricResult] = Field(default_factory=dict)


class RunRecord(BaseModel):
    """The root of results.json."""

    model_config = ConfigDict(extra="forbid")

    schema_version: str = SCHEMA_VERSION
    tensorscope_version: str
    plugins: list[PluginRecord] = Field(default_factory=list)
    config: dict[str, Any]
    device: str
    dtype: str
    models: list[ModelRecord] = Field(default_factory=list)
    model_set: dict[str, MetricResult] = Field(default_factory=dict)
    seconds_total: float | None = None
