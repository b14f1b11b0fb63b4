"""Flatten results into the tall table ``run, layer, head, metric, field, index, value, ci_low, ci_high``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .schema import HeadValue, LayerValue, MetricResult, RunRecord, ScalarValue, SeriesValue

COLUMNS = ("run", "layer", "head", "metric", "field", "index", "value", "ci_low", "ci_high")


def _rows(run: str, result: MetricResult) -> Iterator[dict[str, Any]]:
    if result.status != "ok":
        return
    for field, value in result.values.items():
        base = {"run": run, "metric": result.metric, "field": field, "layer": None, "head": None,
                "index": None, "ci_low": None, "ci_high": None}
        if isinstance(value, ScalarValue):
            yield {**base, "value": value.value, "ci_low": value.ci_low, "ci_high": value.ci_high}
        elif isinstance(value, LayerValue):
            for i, v in enumerate(value.values):
                label = value.labels[i] if value.labels else None
                yield {**base, "layer": i if label is None else label, "value": v}
        elif isinstance(value, HeadValue):
            for layer, row in enumerate(value.values):
                for head, v in enumerate(row):
                    yield {**base, "layer": layer, "head": head, "value": v}
        elif isinstance(value, SeriesValue):
            for i, v in enumerate(value.values):
                yield {**base, "index": i, "value": v}


def tall_rows(record: RunRecord) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for model in record.models:
        for result in model.metrics.values():
            rows.extend(_rows(model.name, result))
    for result in record.model_set.values():
        rows.extend(_rows("*", result))
    return rows
