"""Comparisons across models and checkpoints: order, differences, trends, early indicators.

Checkpoints are ordered by the step in their names (see ``checkpoints.order_models``) or by an
explicit order. Each kind of test (differences, trends, early indicators) is one Benjamini-Hochberg family.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from .checkpoints import name_key, order_models
from .errors import UsageError, did_you_mean
from .results.analysis import (
    ChangeSpan,
    Comparisons,
    EarlyIndicator,
    LayerTrajectory,
    ModelOrder,
    PairDifference,
    ScalarComparison,
)
from .results.schema import HeadValue, LayerValue, ModelRecord, RunRecord, ScalarValue, TableValue
from .stats import InsufficientSampleWarning, _Stat, adjust, correlation, difference_test, trend_test

ALL_PAIRS_UP_TO = 8  # model sets larger than this compare neighbours only


def _scalars(models: Sequence[ModelRecord]) -> dict[tuple[str, str], dict[str, ScalarValue]]:
    found: dict[tuple[str, str], dict[str, ScalarValue]] = {}
    for m in models:
        for result in m.metrics.values():
            if result.ok:
                for field, value in result.values.items():
                    if isinstance(value, ScalarValue):
                        found.setdefault((result.metric, field), {})[m.name] = value
    return found


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _pairs(names: Sequence[str], series: bool) -> list[tuple[str, str]]:
    if series or len(names) > ALL_PAIRS_UP_TO:
        pairs = list(itertools.pairwise(names))
        if len(names) > 2:
            pairs.append((names[0], names[-1]))
        return pairs
    return list(itertools.combinations(names, 2))


def _difference(a: str, b: str, values: Mapping[str, ScalarValue], records: Mapping[str, ModelRecord],
                min_n: int, seed: int) -> PairDifference:
    va, vb = values.get(a), values.get(b)
    xa = va.value if va is not None else None
    xb = vb.value if vb is not None else None
    diff = xb - xa if _finite(xa) and _finite(xb) else None  # type: ignore[operator]
    out = PairDifference(a=a, b=b, value_a=xa, value_b=xb, difference=diff)
    if va is None or vb is None:
        out.note = "missing on one model"
    elif not va.samples or not vb.samples:
        out.note = "no per-example values: difference not tested"
    else:
        same_data = records[a].data_fingerprint is not None and \
            records[a].data_fingerprint == records[b].data_fingerprint and len(va.samples) == len(vb.samples)
        out.test = difference_test(_nan(va.samples), _nan(vb.samples), paired=same_data, min_n=min_n, seed=seed)
    return out


def _nan(values: Sequence[float | None]) -> list[float]:
    return [math.nan if v is None else v for v in values]


def _extremes(names: Sequence[str], values: Sequence[float | None]) -> tuple[str | None, str | None]:
    finite = [(float(v), n) for n, v in zip(names, values, strict=True) if v is not None and math.isfinite(v)]
    if len(finite) < 2 or len({v for v, _ in finite}) == 1:
        return None, None
    return max(finite, key=lambda t: t[0])[1], min(finite, key=lambda t: t[0])[1]


def _compare_scalar(key: tuple[str, str], values: Mapping[str, ScalarValue], order: ModelOrder,
                    records: Mapping[str, ModelRecord], min_n: int, trend_min_n: int, seed: int) -> ScalarComparison:
    names = order.names
    got = [values.get(n) for n in names]
    nums = [v.value if v is not None else None for v in got]
    highest, lowest = _extremes(names, nums)
    out = ScalarComparison(
        metric=key[0], field=key[1], unit=next((v.unit for v in got if v is not None and v.unit), None),
        models=list(names), values=nums, ci_low=[v.ci_low if v else None for v in got],
        ci_high=[v.ci_high if v else None for v in got], highest=highest, lowest=lowest)
    if len(names) >= 2:
        out.differences = [_difference(a, b, values, records, min_n, seed) for a, b in _pairs(names, order.is_series)]
    if order.is_series and len(names) >= 2:
        out.trend = trend_test(_nan(nums), min_n=trend_min_n)
    return out


def _labelled(value: LayerValue) -> dict[str, float | None]:
    return dict(zip(value.keys(), value.values, strict=True))


def _layer_trajectories(order: ModelOrder, records: Mapping[str, ModelRecord],
                        trend_min_n: int) -> list[LayerTrajectory]:
    found: dict[tuple[str, str], dict[str, dict[str, float | None]]] = {}
    for name in order.names:
        for result in records[name].metrics.values():
            if result.ok:
                for field, value in result.values.items():
                    if isinstance(value, LayerValue):
                        found.setdefault((result.metric, field), {})[name] = _labelled(value)
    out = []
    for (metric, field), per_model in found.items():
        labels = list(dict.fromkeys(label for row in per_model.values() for label in row))
        rows = [[per_model.get(n, {}).get(label) for label in labels] for n in order.names]
        trends = [trend_test(_nan([row[j] for row in rows]), min_n=trend_min_n) for j in range(len(labels))]
        out.append(LayerTrajectory(metric=metric, field=field, models=list(order.names), labels=labels,
                                   values=rows, trends=trends))
    return out


def _units(value: Any) -> list[float | None] | None:
    """The per-unit numbers of a layer or head field, flattened (None for other kinds)."""
    if isinstance(value, LayerValue):
        return list(value.values)
    if isinstance(value, HeadValue):
        return [v for row in value.values for v in row]
    return None


def _early_vs_final(order: ModelOrder, records: Mapping[str, ModelRecord], early: str, min_n: int,
                    seed: int) -> list[EarlyIndicator]:
    out = []
    first, last = records[early], records[order.names[-1]]
    for name, result in first.metrics.items():
        final = last.metrics.get(name)
        if not (result.ok and final is not None and final.ok):
            continue
        for field, value in result.values.items():
            x, y = _units(value), _units(final.values.get(field))
            if x is None or y is None or len(x) != len(y):
                continue
            stat = correlation(_nan(x), _nan(y), method="spearman", min_n=min_n, seed=seed)
            out.append(EarlyIndicator(metric=name, field=field, early=early, target="final", stat=stat))
    return out


def _against_outcome(order: ModelOrder, scalars: Mapping[tuple[str, str], Mapping[str, ScalarValue]],
                     outcome: Mapping[str, float], min_n: int, seed: int) -> list[EarlyIndicator]:
    by_norm = {name_key(k): float(v) for k, v in outcome.items()}
    unknown = [k for k in by_norm if k not in {name_key(n) for n in order.names}]
    if unknown:
        raise UsageError(f"outcome names models not in these results: {unknown}",
                         f"use the model names {order.names}")
    names = [n for n in order.names if name_key(n) in by_norm]
    out = []
    for (metric, field), values in scalars.items():
        xs = [values[n].value if n in values else None for n in names]
        stat = correlation(_nan(xs), [by_norm[name_key(n)] for n in names], method="spearman", min_n=min_n, seed=seed)
        out.append(EarlyIndicator(metric=metric, field=field, early=None, target="outcome", stat=stat))
    return out


#: the columns that make a model-set result's table a list of change points (see ``_change_spans``)
CHANGE_POINT_COLUMNS = ("series", "model_before", "model_after")


def _change_spans(record: RunRecord) -> dict[str, list[ChangeSpan]]:
    """{series: changes} from every model-set table with the change-point columns: ``series`` is
    ``metric.field`` or ``metric.field[label]`` (a per-layer field), the models are consecutive
    checkpoints. This is how a plugin's change-point detector reaches compare() and the report."""
    spans: dict[str, list[ChangeSpan]] = {}
    for metric, result in record.model_set.items():
        for value in result.values.values() if result.ok else ():
            if not isinstance(value, TableValue) or not set(CHANGE_POINT_COLUMNS) <= set(value.columns):
                continue
            at = [value.columns.index(c) for c in CHANGE_POINT_COLUMNS]
            for row in value.rows:
                series, before, after = (row[i] for i in at)
                base, _, label = str(series).partition("[")
                spans.setdefault(base, []).append(ChangeSpan(model_before=str(before), model_after=str(after),
                                                             found_by=metric, label=label.rstrip("]") or None))
    return spans


def _floor_warnings(kind: str, family: Sequence[_Stat], min_n: int) -> list[str]:
    below = [s for s in family if not s.claimed and s.reason and "min_n" in s.reason]
    if not below:
        return []
    largest = max(s.n for s in below)
    return [f"{len(below)} {kind} below the floor of {min_n} (largest n={largest}): described, not claimed"]


def compare(record: RunRecord, *, order: Sequence[str] | None = None, outcome: Mapping[str, float] | None = None,
            early: str | None = None, alpha: float = 0.05, min_n: int = 30, trend_min_n: int = 5,
            seed: int | None = None) -> Comparisons:
    """Per scalar: values, highest/lowest, pairwise differences (tested on per-example
    values where the metric kept them), and across checkpoints a trend; per-layer
    trajectories; early indicators (``early`` checkpoint, default the first, against
    the last; and every scalar against ``outcome``, a number per model)."""
    if seed is None:
        seed = int(record.config.get("seed", 0))
    records = {m.name: m for m in record.models}
    ordering = order_models(list(records), order)
    scalars = _scalars(record.models)
    result = Comparisons(order=ordering, alpha=alpha, min_n=min_n, trend_min_n=trend_min_n,
                         outcome=dict(outcome) if outcome is not None else None)
    result.scalars = [_compare_scalar(k, v, ordering, records, min_n, trend_min_n, seed) for k, v in scalars.items()]
    if ordering.is_series:
        result.layers = _layer_trajectories(ordering, records, trend_min_n)
        if early is not None and name_key(early) not in {name_key(n) for n in ordering.names}:
            raise UsageError(f"early checkpoint '{early}' is not in these results; "
                             f"{did_you_mean(early, ordering.names)}", f"choose one of {ordering.names}")
        start = next((n for n in ordering.names if early is not None and name_key(n) == name_key(early)),
                     ordering.names[0])
        if start != ordering.names[-1]:
            result.early_indicators = _early_vs_final(ordering, records, start, min_n, seed)
    if outcome is not None:
        result.early_indicators += _against_outcome(ordering, scalars, outcome, min_n, seed)
    spans = _change_spans(record)
    for s in result.scalars:
        s.changes = [c for c in spans.get(f"{s.metric}.{s.field}", []) if c.label is None]
    for lt in result.layers:
        lt.changes = [c for c in spans.get(f"{lt.metric}.{lt.field}", []) if c.label is not None]
    differences = [d.test for s in result.scalars for d in s.differences if d.test is not None]
    trends = [s.trend for s in result.scalars if s.trend is not None] + [t for lt in result.layers for t in lt.trends]
    indicators = [e.stat for e in result.early_indicators]
    for family in (differences, trends, indicators):
        adjust(family, alpha)
    untested = sum(1 for s in result.scalars for d in s.differences
                   if d.test is None and d.note and "per-example" in d.note)
    if untested:
        result.warnings.append(f"{untested} differences between models not tested: the metrics kept no per-example "
                               f"values (only their estimates and CIs are compared)")
    result.warnings += _floor_warnings("difference tests", differences, min_n)
    result.warnings += _floor_warnings("trend tests", trends, trend_min_n)
    result.warnings += _floor_warnings("early-indicator correlations", indicators, min_n)
    if any("floor" in w for w in result.warnings):
        warnings.warn("; ".join(w for w in result.warnings if "floor" in w), InsufficientSampleWarning, stacklevel=3)
    return result
