"""The typed, versioned result schema (JSON Schema published in docs/result-schema.json)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = "1.1"  # 1.1: ScalarValue.samples (optional, additive)

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


class LayerValue(_Value):
    """One number per layer; ``labels`` names the entries when they are not plain layers."""

    kind: Literal["per_layer"] = "per_layer"
    values: list[Float]
    labels: list[str] | None = None


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
    flops: float = 0.0


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


class ModelRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    family: str
    fingerprint: str
    dims: dict[str, int]
    data_fingerprint: str | None = None
    n_sequences: int = 0
    n_tokens: int = 0
    passes: dict[str, int] = Field(default_factory=dict)
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
