"""Results -> tracker events: one scalar per numeric tall-table row, tagged
``metric/field[/L{layer}[/H{head}]]`` (``/I{index}`` for series), at the checkpoint's step.

Tags are one namespace in every tracker, so they are made safe for the strictest (MLflow: letters,
digits, ``_ - . : /`` and spaces), and a ``/`` inside a field name (``loss/<task>``) becomes ``:``: a
tag is never the folder of another (MLflow's file store keeps each metric as a file under that path),
and a tag reads back as metric, field, layer, head.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..checkpoints import name_key, step_of
from ..results.schema import MetricResult, RunRecord, TableValue, TextValue
from ..results.table import tall_rows

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. :]")
MODEL_SET = "model_set"  # the tag prefix of model-set results (the tall table's run "*")


@dataclass
class Table:
    """A table value as the trackers take it: column names and rows."""

    columns: list[str]
    rows: list[list[Any]]

    def markdown(self) -> str:
        """The table as Markdown (TensorBoard renders text entries as Markdown)."""
        def cell(v: Any) -> str:
            return str(v).replace("|", "\\|").replace("\n", " ")
        lines = ["| " + " | ".join(map(cell, self.columns)) + " |", "|" + " --- |" * len(self.columns)]
        lines += ["| " + " | ".join(map(cell, row)) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclass
class StepBatch:
    """Everything logged at one step: trackers such as W&B take one step's values in one call."""

    scalars: dict[str, float] = field(default_factory=dict)
    tables: dict[str, Table] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)


def _part(text: Any) -> str:
    return _UNSAFE.sub("_", str(text).replace("/", ":"))


def tag(metric: str, field_name: str, layer: Any = None, head: Any = None, index: Any = None,
        prefix: str | None = None) -> str:
    """``[prefix/]metric/field[/L{layer}[/H{head}]][/I{index}]`` made safe for every tracker."""
    parts = [prefix] if prefix else []
    parts += [_part(metric), _part(field_name)]
    if layer is not None:
        parts.append(f"L{_part(layer)}")
    if head is not None:
        parts.append(f"H{_part(head)}")
    if index is not None:
        parts.append(f"I{_part(index)}")
    return "/".join(parts)


def _number(value: Any) -> float | None:
    """A row's value as a float (null, written for NaN, becomes NaN); None for a non-number."""
    if value is None:
        return float("nan")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _prefixes(record: RunRecord, steps: dict[str, int]) -> dict[str, str | None]:
    """No prefix while each model has its own step (a checkpoint series); when two share a step (different
    models, not checkpoints of one) the model's name goes before every tag: its last path part where
    those are unique, else its whole name."""
    names = [m.name for m in record.models]
    if len({steps[n] for n in names}) == len(names):
        return {n: None for n in [*names, "*"]}
    leaves = [re.split(r"[/\\]", name_key(n))[-1] for n in names]
    labels = leaves if len(set(leaves)) == len(leaves) and all(leaves) else [name_key(n) for n in names]
    prefixes: dict[str, str | None] = {n: _part(label) for n, label in zip(names, labels, strict=True)}
    return prefixes | {"*": MODEL_SET}


def _results(record: RunRecord) -> list[tuple[str, MetricResult]]:
    pairs = [(m.name, r) for m in record.models for r in m.metrics.values()]
    return pairs + [("*", r) for r in record.model_set.values()]


def step_batches(record: RunRecord, step: int | None = None) -> list[tuple[int, StepBatch]]:
    """The record's events grouped by step, steps ascending. ``step``: the step of every model (a
    training loop's); default: the step each model's name carries (``checkpoints.step_of``), else 0.
    Model-set results go at the last model's step."""
    steps = {m.name: step if step is not None else (step_of(m.name) or 0) for m in record.models}
    steps["*"] = max(steps.values(), default=step or 0)
    prefix = _prefixes(record, steps)
    batches: dict[int, StepBatch] = defaultdict(StepBatch)
    for row in tall_rows(record):
        number = _number(row["value"])
        if number is not None:
            name = tag(row["metric"], row["field"], row["layer"], row["head"], row["index"], prefix[row["run"]])
            batches[steps[row["run"]]].scalars[name] = number
    for run, result in _results(record):
        if result.status != "ok":
            continue
        for field_name, value in result.values.items():
            name = tag(result.metric, field_name, prefix=prefix[run])
            if isinstance(value, TableValue):
                batches[steps[run]].tables[name] = Table(list(value.columns), [list(r) for r in value.rows])
            elif isinstance(value, TextValue):
                batches[steps[run]].texts[name] = value.text
    return sorted(batches.items())
