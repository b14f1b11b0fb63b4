"""Flatten results into the tall table ``run, layer, head, metric, field, index, value, ci_low, ci_high``.

A table value gives one row per cell: ``field`` is ``<field>.<column>`` and ``index`` the table's row,
so the cells of one table row share their index; a table with ``layer`` / ``head`` columns fills those
keys from them instead of giving them rows of their own (``grep high_potential results.csv`` then
shows the head it is about)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .schema import HeadValue, LayerValue, MetricResult, RunRecord, ScalarValue, SeriesValue, TableValue

COLUMNS = ("run", "layer", "head", "metric", "field", "index", "value", "ci_low", "ci_high")
KEY_COLUMNS = ("layer", "head")  # table columns that become the tall table's keys


def _table_rows(base: dict[str, Any], field: str, table: TableValue) -> Iterator[dict[str, Any]]:
    keys = [c for c in KEY_COLUMNS if c in table.columns]
    for i, row in enumerate(table.rows):
        cells = dict(zip(table.columns, row, strict=False))  # the schema does not check row lengths: never fail a save
        where = {c: cells[c] for c in keys}
        for column, v in cells.items():
            if column not in keys:
                yield {**base, **where, "field": f"{field}.{column}", "index": i, "value": v}


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
        elif isinstance(value, TableValue):
            yield from _table_rows(base, field, value)


def tall_rows(record: RunRecord) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for model in record.models:
        for result in model.metrics.values():
            rows.extend(_rows(model.name, result))
    for result in record.model_set.values():
        rows.extend(_rows("*", result))
    return rows
