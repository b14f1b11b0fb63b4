"""Correlation discovery: every pair of metric values that share a unit of analysis.

Units: ``layer`` (one observation per model and layer), ``head`` (model, layer, head),
``model`` (one scalar per model) and ``checkpoint`` (the change of a scalar between
consecutive checkpoints: two metrics that both drift during training would
otherwise always correlate through time alone). Per-layer values are joined only with
values on the same axis (``LayerValue.axis``: blocks, residual-stream positions, or
labelled entries), so the embeddings (``resid`` position 0) never meet block 0. A metric
is never paired with itself (any two of its fields) nor with a metric it is declared to
derive from (``derived_from`` as recorded in the results, followed transitively), so a
report made where a plugin is not installed excludes the same pairs. All tested pairs
of one call are one Benjamini-Hochberg family.

The layers (or heads) of one model are not independent of its other values: over several
models a pair is correlated within models (ranks centred per model, permutation within models),
so two metrics that both drift across checkpoints do not correlate through the checkpoint alone.
Each finding's ``test`` says which test it had.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .checkpoints import order_models
from .errors import UsageError, did_you_mean
from .results.analysis import Discovery, ExcludedPair, Finding, ModelOrder, Unit
from .results.schema import HeadValue, LayerValue, RunRecord, ScalarValue
from .stats import N_RESAMPLES, InsufficientSampleWarning, Method, adjust, correlation, grouped_correlation

UNITS: tuple[Unit, ...] = ("layer", "head", "model", "checkpoint")
Key = tuple[str, ...]


@dataclass
class Variable:
    """One metric field observed over the units: unit key -> number."""

    metric: str
    field: str
    values: dict[Key, float]
    #: per-layer values: the axis their entries live on; pairs are formed within one axis
    axis: str = ""

    @property
    def label(self) -> str:
        return f"{self.metric}.{self.field}"


def _put(found: dict[str, Variable], metric: str, field: str, key: Key, value: float | None,
         axis: str = "") -> None:
    if value is not None and math.isfinite(value):
        var = found.setdefault(f"{metric}.{field}", Variable(metric, field, {}, axis))
        var.values[key] = value


#: fields that bound another field's estimate (its CI): functions of it, never variables of their own
CI_SUFFIXES = ("_ci_low", "_ci_high")


def collect(record: RunRecord, unit: Unit, order: ModelOrder) -> dict[str, Variable]:
    """The variables observed over ``unit``, by label (``metric.field``); a field's CI bounds are not
    variables (they would correlate with their own estimate, and with whatever it correlates with)."""
    found: dict[str, Variable] = {}
    records = {m.name: m for m in record.models}
    names = order.names
    for name in names:
        for result in records[name].metrics.values():
            if not result.ok:
                continue
            for field, value in result.values.items():
                if field.endswith(CI_SUFFIXES):
                    continue
                if unit == "layer" and isinstance(value, LayerValue):
                    for key, v in zip(value.keys(), value.values, strict=True):
                        _put(found, result.metric, field, (name, key), v, value.on_axis)
                elif unit == "head" and isinstance(value, HeadValue):
                    for layer, row in enumerate(value.values):
                        for head, v in enumerate(row):
                            _put(found, result.metric, field, (name, str(layer), str(head)), v)
                elif unit == "model" and isinstance(value, ScalarValue):
                    _put(found, result.metric, field, (name,), value.value)
    if unit == "checkpoint":
        per_model = collect(record, "model", order)
        for var in per_model.values():
            for a, b in itertools.pairwise(names):
                if (a,) in var.values and (b,) in var.values:
                    _put(found, var.metric, var.field, (a, b), var.values[(b,)] - var.values[(a,)])
    return found


def derivations(record: RunRecord, extra: Mapping[str, Sequence[str]] | None = None) -> dict[str, set[str]]:
    """Each metric's declared sources as recorded in its results (``MetricResult.derived_from``),
    plus ``extra``, followed transitively."""
    direct: dict[str, set[str]] = {}
    results = [r for m in record.models for r in m.metrics.values()] + list(record.model_set.values())
    for result in results:
        direct.setdefault(result.metric, set()).update(result.derived_from)
    for name, sources in (extra or {}).items():
        direct.setdefault(name, set()).update(sources)

    def sources_of(source: str) -> set[str]:
        """What ``source`` (a metric, or a ``metric.field`` label) is derived from in turn."""
        owner = next((m for m in direct if source == m or source.startswith(m + ".")), None)
        return direct.get(owner, set()) if owner else set()

    closed: dict[str, set[str]] = {}
    for name in direct:
        seen: set[str] = set()
        todo = list(direct[name])
        while todo:
            source = todo.pop()
            if source not in seen:
                seen.add(source)
                todo.extend(sources_of(source))
        closed[name] = seen
    return closed


def _excluded(x: Variable, y: Variable, derived: Mapping[str, set[str]]) -> str | None:
    if x.metric == y.metric:
        return "same metric"
    for a, b in ((x, y), (y, x)):
        sources = derived.get(a.metric, set()) | derived.get(a.label, set())
        if b.metric in sources or b.label in sources:
            return f"{a.label} is declared to derive from {b.metric}"
    return None


def _select(found: dict[str, Variable], metrics: Sequence[str] | None) -> dict[str, Variable]:
    if metrics is None:
        return found
    chosen = {}
    for wanted in metrics:
        hits = {k: v for k, v in found.items() if wanted in (k, v.metric)}
        if not hits:
            known = sorted(found) + sorted({v.metric for v in found.values()})
            raise UsageError(f"no values of '{wanted}' over this unit; {did_you_mean(wanted, known)}",
                             "name metrics or metric.field labels that the results hold for this unit")
        chosen.update(hits)
    return chosen


def discover_correlations(record: RunRecord, metrics: Sequence[str] | None = None, unit: Unit = "layer",
                          method: Method = "spearman", min_n: int = 30, fdr: float = 0.05, *,
                          order: Sequence[str] | None = None, derived: Mapping[str, Sequence[str]] | None = None,
                          seed: int | None = None, n_resamples: int = N_RESAMPLES, pooled: bool = False) -> Discovery:
    """Correlate every eligible pair of variables over ``unit``; see the module docstring.

    Over layers or heads of several models, each pair is tested within models (``stats.grouped_correlation``)
    unless ``pooled=True``, which treats every (model, layer) as independent (pseudo-replication)."""
    if unit not in UNITS:
        raise UsageError(f"unknown unit {unit!r}", f"choose one of {', '.join(UNITS)}")
    if method not in ("spearman", "pearson"):
        raise UsageError(f"unknown method {method!r}", "choose 'spearman' or 'pearson'")
    if seed is None:
        seed = int(record.config.get("seed", 0))
    ordering = order_models([m.name for m in record.models], order)
    if unit == "checkpoint" and not ordering.is_series:
        raise UsageError("unit='checkpoint' needs models ordered as checkpoints",
                         "name them with their step (ckpt_step_1000, checkpoint-500) or pass order=[...]")
    found = _select(collect(record, unit, ordering), metrics)
    derived_map = derivations(record, derived)
    out = Discovery(unit=unit, method=method, min_n=min_n, fdr=fdr, variables=sorted(found))
    pairs = [(x, y) for x, y in itertools.combinations([found[k] for k in sorted(found)], 2) if x.axis == y.axis]
    for x, y in pairs:
        reason = _excluded(x, y, derived_map)
        if reason:
            out.excluded.append(ExcludedPair(x=x.label, y=y.label, reason=reason))
            continue
        keys = sorted(set(x.values) & set(y.values))
        xs, ys = [x.values[k] for k in keys], [y.values[k] for k in keys]
        models = [k[0] for k in keys]
        if unit in ("layer", "head") and len(set(models)) >= 2 and not pooled:
            stat = grouped_correlation(xs, ys, models, method=method, min_n=min_n, seed=seed,
                                       n_resamples=n_resamples)
        else:
            stat = correlation(xs, ys, method=method, min_n=min_n, seed=seed, n_resamples=n_resamples)
        finding = Finding(**stat.model_dump(), x=x.label, y=y.label, x_metric=x.metric, y_metric=y.metric, unit=unit)
        (out.findings if finding.claimed else out.not_claimed).append(finding)
    adjust(out.findings, fdr)
    out.findings.sort(key=lambda f: (-abs(f.r or 0.0), f.p if f.p is not None else 1.0))
    out.not_claimed.sort(key=lambda f: -abs(f.r or 0.0))
    below = [f for f in out.not_claimed if f.reason and "min_n" in f.reason]
    if below:
        text = (f"{len(below)} of {len(below) + len(out.findings)} pairs over unit '{unit}' have fewer than "
                f"min_n={min_n} observations (largest n={max(f.n for f in below)}): not claimed")
        out.warnings.append(text)
        warnings.warn(text, InsufficientSampleWarning, stacklevel=3)
    if len(found) < 2:
        out.warnings.append(f"fewer than two variables over unit '{unit}': nothing to correlate")
    return out
