"""Typed records of what is computed *from* results: comparisons, correlation findings,
interpretations, and the report JSON that adds them to the run record.

Only types live here (the computations are in compare.py and discovery.py), so the
report JSON has one published shape.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..stats import Correlation, Difference, Trend
from .schema import Float, RunRecord

Unit = Literal["layer", "head", "model", "checkpoint"]
REPORT_VERSION = "1.0"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="null")


class Interpretation(_Record):
    """A reading of a result that its metric defines (``Metric.interpret``): hotspots, warnings."""

    level: Literal["info", "warning", "hotspot"] = "info"
    text: str
    where: str | None = None


class ModelOrder(_Record):
    """The order models are compared in, and where it came from."""

    names: list[str]
    steps: list[int | None]
    ordered_by: Literal["step", "explicit", "given"]

    @property
    def is_series(self) -> bool:
        """Checkpoints of one training run (trajectories and trends make sense)."""
        return self.ordered_by in ("step", "explicit") and len(self.names) >= 2


class PairDifference(_Record):
    """Model ``b`` against model ``a``: the reported values and, where per-example values
    exist, a test of their difference."""

    a: str
    b: str
    value_a: Float
    value_b: Float
    difference: Float
    test: Difference | None = None
    note: str | None = None


class ChangeSpan(_Record):
    """A change found between two consecutive checkpoints (by a model-set metric such as
    ``dynamics.phase_transitions``): where the report shades a trajectory."""

    model_before: str
    model_after: str
    found_by: str
    #: the layer (or other unit) label of a per-layer series; None for a scalar
    label: str | None = None


class ScalarComparison(_Record):
    """One scalar field across the models, in comparison order."""

    metric: str
    field: str
    unit: str | None = None
    models: list[str]
    values: list[Float]
    ci_low: list[Float]
    ci_high: list[Float]
    highest: str | None = None
    lowest: str | None = None
    differences: list[PairDifference] = Field(default_factory=list)
    trend: Trend | None = None
    #: changes between consecutive checkpoints that a model-set metric of the run found in this series
    changes: list[ChangeSpan] = Field(default_factory=list)


class LayerTrajectory(_Record):
    """A per-layer field across checkpoints (rows: models in order), with a trend per layer."""

    metric: str
    field: str
    models: list[str]
    labels: list[str]
    values: list[list[Float]]
    trends: list[Trend] = Field(default_factory=list)
    changes: list[ChangeSpan] = Field(default_factory=list)


class EarlyIndicator(_Record):
    """Does ``metric.field`` at checkpoint ``early`` rank-predict the ``target``?

    ``target='final'``: the same field's units (layers or heads) at the last checkpoint.
    ``target='outcome'``: a user-supplied number per model, correlated across models.
    """

    metric: str
    field: str
    early: str | None
    target: Literal["final", "outcome"]
    stat: Correlation


class Comparisons(_Record):
    """What ``report.compare(results)`` returns."""

    order: ModelOrder
    scalars: list[ScalarComparison] = Field(default_factory=list)
    layers: list[LayerTrajectory] = Field(default_factory=list)
    early_indicators: list[EarlyIndicator] = Field(default_factory=list)
    outcome: dict[str, float] | None = None
    alpha: float
    min_n: int
    trend_min_n: int
    warnings: list[str] = Field(default_factory=list)

    def summary(self) -> list[dict[str, str | None]]:
        """Which model had the highest and the lowest value of each scalar."""
        return [{"metric": s.metric, "field": s.field, "highest": s.highest, "lowest": s.lowest}
                for s in self.scalars if s.highest is not None]


class Finding(Correlation):
    """One pair of metric values over a unit of analysis; ``x`` and ``y`` read ``metric.field``."""

    x: str
    y: str
    x_metric: str
    y_metric: str
    unit: Unit


class ExcludedPair(_Record):
    x: str
    y: str
    reason: str


class Discovery(_Record):
    """What ``report.discover_correlations(results)`` returns: tested pairs sorted by strength
    (``findings``), pairs below the floor or undefined (``not_claimed``) and pairs never
    tested because one derives from the other (``excluded``)."""

    unit: Unit
    method: Literal["spearman", "pearson"]
    min_n: int
    fdr: float
    variables: list[str]
    findings: list[Finding] = Field(default_factory=list)
    not_claimed: list[Finding] = Field(default_factory=list)
    excluded: list[ExcludedPair] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)

    @property
    def significant(self) -> list[Finding]:
        """The findings that survive the FDR correction, strongest first."""
        return [f for f in self.findings if f.significant]


class ReportRecord(RunRecord):
    """The report JSON: the run record with comparisons and correlation findings added."""

    report_version: str = REPORT_VERSION
    comparisons: Comparisons | None = None
    correlations: list[Discovery] = Field(default_factory=list)
