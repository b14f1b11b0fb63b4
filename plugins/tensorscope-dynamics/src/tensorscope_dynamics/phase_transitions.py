"""dynamics.phase_transitions: change points of any scalar or per-layer series over checkpoints."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import Field, field_validator

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

from .changepoints import detect
from .checkpoints import SeriesParams, order_checkpoints

DEFAULT_NEEDS = ("basic.loss",)
CHANGE_COLUMNS = [
    "series",
    "index",
    "model_before",
    "model_after",
    "step_before",
    "step_after",
    "step_at",
    "mean_before",
    "mean_after",
    "size_sd",
]


def split_name(entry: str) -> tuple[str, str | None]:
    """``family.metric`` -> (metric, None); ``family.metric.field`` -> (metric, field)."""
    parts = entry.split(".", 2)
    return f"{parts[0]}.{parts[1]}", (parts[2] if len(parts) == 3 else None)


class PhaseParams(SeriesParams):
    series: list[str] | None = Field(
        None,
        description="series to search, each 'family.metric' (all its scalar and per-layer fields) or "
        "'family.metric.field' (a per-layer field gives one series per layer); default: every "
        "scalar field of every metric of the run (basic.loss is added to the run)",
    )

    @field_validator("series")
    @classmethod
    def _names(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            bad = [v for v in value if v.count(".") < 1 or "" in v.split(".", 2)]
            if bad or not value:
                raise ValueError(f"each series is 'family.metric' or 'family.metric.field', got {bad or value}")
        return value


def collect_series(
    names: list[str], results: Mapping[str, Mapping[str, MetricResult]], wanted: list[str] | None
) -> dict[str, list[float | None]]:
    """{series: value per member in ``names``' order}; per-layer fields only where named."""
    chosen = [split_name(w) for w in wanted] if wanted is not None else None
    out: dict[str, list[float | None]] = {}
    for position, name in enumerate(names):
        for metric, result in results[name].items():
            if not result.ok:
                continue
            for field, value in result.values.items():
                if chosen is not None and not any(m == metric and f in (None, field) for m, f in chosen):
                    continue
                if isinstance(value, ScalarValue):
                    entries = {f"{metric}.{field}": value.value}
                elif isinstance(value, LayerValue) and chosen is not None:
                    entries = {f"{metric}.{field}[{k}]": v for k, v in zip(value.keys(), value.values, strict=True)}
                else:
                    continue
                for key, v in entries.items():
                    out.setdefault(key, [None] * len(names))[position] = v
    return out


class PhaseTransitions(ModelSetMetric):
    """Change points of checkpoint series (a model set: the checkpoints of one run). Each series
    (a scalar field, or one layer of a per-layer field, over the members in step order) is cut
    by PELT (``ruptures.Pelt(model="l2", min_size=2, jump=1)``: every position is a candidate,
    each segment has at least 2 checkpoints) with penalty 2 sigma^2 log n, where n is the number
    of checkpoints and sigma = 1.4826 MAD(first differences) / sqrt(2) (the SD of the differences
    / sqrt 2 when their MAD is 0). A change at index k lies between the checkpoints k - 1 and k:
    ``step_before`` .. ``step_after``; ``step_at`` is their midpoint, on log(1 + step) when the
    steps are unevenly spaced (PELT's l2 cost depends on the order only, not on the spacing).
    ``size_sd`` is the jump of the segment means in pooled SDs of the two adjacent segments
    (null when both are flat).
    """

    name = "dynamics.phase_transitions"
    version = "1"
    summary = "change points of scalar / per-layer series across checkpoints (PELT, ruptures)"
    Params = PhaseParams
    requires_metrics = DEFAULT_NEEDS
    reads_weights = False
    fields = {
        "changes": "table: " + ", ".join(CHANGE_COLUMNS),
        "n_changes": "changes found over all series",
        "n_series": "series searched",
        "checkpoints": "table model, step: the members in the order searched",
        "not_searched": "table series, reason: series that could not be searched",
    }

    @classmethod
    def metric_needs(cls, params: PhaseParams) -> tuple[str, ...]:
        if params.series is None:
            return DEFAULT_NEEDS
        return tuple(dict.fromkeys(split_name(s)[0] for s in params.series))

    @classmethod
    def cost(cls, params: Any, view: ModelView, shape: RunShape) -> Cost:
        return Cost(state_bytes=0)

    @classmethod
    def set_skip_reason(cls, params: Any, views: Mapping[str, ModelView], base_name: str | None) -> str | None:
        if len(views) < 4:
            return f"{cls.name} needs at least 4 checkpoints (2 on each side of a change), got {len(views)}"
        return None

    def compute_set(
        self, views: Mapping[str, ModelView], results: Mapping[str, Mapping[str, MetricResult]]
    ) -> dict[str, Any]:
        ckpts = order_checkpoints(list(views), self.params.steps)
        series = collect_series(ckpts.names, results, self.params.series)
        if not series:
            raise ValueError(f"no series found for {self.params.series or 'the scalars of the run'}")
        rows: list[list[Any]] = []
        skipped: list[list[Any]] = []
        for key, values in series.items():
            found = detect([math.nan if v is None else v for v in values])
            if isinstance(found, str):
                skipped.append([key, found])
                continue
            for c in found:
                size = c.size_sd
                rows.append(
                    [
                        key,
                        c.index,
                        ckpts.names[c.index - 1],
                        ckpts.names[c.index],
                        ckpts.steps[c.index - 1],
                        ckpts.steps[c.index],
                        ckpts.midpoint(c.index - 1, c.index),
                        c.mean_before,
                        c.mean_after,
                        None if math.isnan(size) else size,
                    ]
                )
        return {
            "changes": TableValue(columns=CHANGE_COLUMNS, rows=rows),
            "n_changes": ScalarValue(value=len(rows)),
            "n_series": ScalarValue(value=len(series) - len(skipped)),
            "checkpoints": TableValue(
                columns=["model", "step"], rows=[[n, s] for n, s in zip(ckpts.names, ckpts.steps, strict=True)]
            ),
            "not_searched": TableValue(columns=["series", "reason"], rows=skipped),
        }
