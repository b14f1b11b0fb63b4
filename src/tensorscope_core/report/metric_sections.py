"""One section per plugin: each metric's values across the models, drawn by value kind
(scalars with CIs, per-layer lines, layer x head heatmaps, spectra), its failures and
the interpretations the metric defines."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..results.analysis import Interpretation
from ..results.schema import (
    HeadValue,
    LayerValue,
    MetricResult,
    ScalarValue,
    SeriesValue,
    TableValue,
    TensorValue,
    TextValue,
)
from . import plots
from .blocks import Figure, Heading, Items, Para, Section, Table, ci, num

if TYPE_CHECKING:
    from ..results import Results

MAX_TABLE_ROWS = 40
#: a metric's section draws at most this many figures of non-scalar fields and this many scalar
#: panels (in field order); the rest are named, and every value is in results.json / results.csv
MAX_FIGURES = 6
MAX_SCALAR_PANELS = 12


def _by_metric(results: Results, order: Sequence[str],
               label: Mapping[str, str]) -> dict[str, dict[str, MetricResult]]:
    """metric -> model (display name) -> result, in comparison order (model-set metrics under '(model set)')."""
    out: dict[str, dict[str, MetricResult]] = {}
    models = {m.name: m for m in results.record.models}
    for name in order:
        for metric, result in models[name].metrics.items():
            out.setdefault(metric, {})[label[name]] = result
    for metric, result in results.record.model_set.items():
        out.setdefault(metric, {})["(model set)"] = result
    return out


def _field_blocks(metric: str, field: str, per_model: Mapping[str, Any], series_order: bool,
                  xlabels: Sequence[str]) -> list[Any]:
    """Blocks for one non-scalar field across the models that have it."""
    first = next(iter(per_model.values()))
    label = f"{metric}.{field}"
    if isinstance(first, LayerValue):
        labels = first.labels or [str(i) for i in range(len(first.values))]
        return [Figure(plots.layer_lines(labels, {m: v.values for m, v in per_model.items()},
                                         f"{label} per layer", ylabel=field))]
    if isinstance(first, HeadValue):
        return [Figure(plots.heatmaps({m: v.values for m, v in per_model.items()}, f"{label} (layer x head)"))]
    if isinstance(first, SeriesValue):
        return [Figure(plots.series_lines({m: v.values for m, v in per_model.items()}, label, first.index_name))]
    if isinstance(first, TableValue):
        blocks: list[Any] = []
        for model, value in per_model.items():
            rows = [list(r) for r in value.rows[:MAX_TABLE_ROWS]]
            more = f" (first {MAX_TABLE_ROWS} of {len(value.rows)} rows)" if len(value.rows) > MAX_TABLE_ROWS else ""
            blocks.append(Table(list(value.columns), rows, f"{label} on {model}{more}"))
        return blocks
    if isinstance(first, TextValue):
        return [Para(f"{label} on {m}: {v.text}") for m, v in per_model.items()]
    return []


def _scalar_blocks(metric: str, fields: Sequence[str], per_model: Mapping[str, MetricResult],
                   series_order: bool, xlabels: Sequence[str]) -> list[Any]:
    models = list(per_model)
    rows = []
    panels = {}
    for field in fields:
        got = [per_model[m].values.get(field) for m in models]
        vals = [v if isinstance(v, ScalarValue) else None for v in got]
        for m, v in zip(models, vals, strict=True):
            if v is not None:
                rows.append([field, m, num(v.value), ci(v.ci_low, v.ci_high), "" if v.n is None else v.n,
                             v.unit or ""])
        panels[field] = ([v.value if v else None for v in vals], [v.ci_low if v else None for v in vals],
                         [v.ci_high if v else None for v in vals])
    blocks: list[Any] = [Table(["field", "model", "value", "95% CI", "n", "unit"], rows)]
    if rows:
        drawn = dict(list(panels.items())[:MAX_SCALAR_PANELS])
        more = f" (the first {MAX_SCALAR_PANELS} of {len(panels)} fields)" if len(panels) > MAX_SCALAR_PANELS else ""
        blocks.append(Figure(plots.scalar_panels(models, drawn, f"{metric}: value per model with 95% CI{more}",
                                                 trajectory=series_order and len(models) > 1, xlabels=xlabels)))
    return blocks


def _tensor_note(metric: str, fields: Sequence[str], first: Mapping[str, TensorValue]) -> Para:
    """One line for a metric's tensor fields (arrays live in tensors.safetensors, not in the report)."""
    shown = ", ".join(f"{f} {first[f].shape}" for f in fields[:4])
    more = f" and {len(fields) - 4} more" if len(fields) > 4 else ""
    return Para(f"{metric}: {len(fields)} tensor field(s) in tensors.safetensors: {shown}{more}", "muted")


def metric_sections(results: Results, order: Sequence[str], series: bool, describe: Mapping[str, dict[str, Any]],
                    interpretations: Sequence[tuple[str, str, Interpretation]],
                    label: Mapping[str, str]) -> list[Section]:
    by_metric = _by_metric(results, order, label)
    plugins: dict[str, list[str]] = {}
    for metric, per_model in by_metric.items():
        plugins.setdefault(next(iter(per_model.values())).plugin, []).append(metric)
    sections = []
    for plugin, metrics in plugins.items():
        section = Section(f"plugin-{plugin}", f"Metrics: {plugin}")
        for metric in metrics:
            per_model = by_metric[metric]
            section.blocks.append(Heading(metric))
            summary = describe.get(metric, {}).get("summary")
            if summary:
                section.blocks.append(Para(summary, "muted"))
            failed = [f"{m}: {r.status} — {r.reason}" for m, r in per_model.items() if not r.ok]
            if failed:
                section.blocks.append(Items(failed, "error"))
            ok = {m: r for m, r in per_model.items() if r.ok}
            if not ok:
                continue
            xlabels = list(ok)
            fields = list(dict.fromkeys(f for r in ok.values() for f in r.values))
            scalars = [f for f in fields if any(isinstance(r.values.get(f), ScalarValue) for r in ok.values())]
            if scalars:
                section.blocks += _scalar_blocks(metric, scalars, ok, series, xlabels)
            tensors: dict[str, TensorValue] = {}
            figures, undrawn = 0, []
            for field in fields:
                if field in scalars:
                    continue
                have = {m: r.values[field] for m, r in ok.items() if field in r.values}
                first = next(iter(have.values()))
                if isinstance(first, TensorValue):
                    tensors[field] = first
                elif isinstance(first, (LayerValue, HeadValue, SeriesValue)) and figures >= MAX_FIGURES:
                    undrawn.append(field)
                else:
                    blocks = _field_blocks(metric, field, have, series, xlabels)
                    figures += sum(isinstance(b, Figure) for b in blocks)
                    section.blocks += blocks
            if undrawn:
                section.blocks.append(Para(f"{metric}: {len(undrawn)} more field(s) not drawn (values in "
                                           f"results.json): {', '.join(undrawn)}", "muted"))
            if tensors:
                section.blocks.append(_tensor_note(metric, list(tensors), tensors))
            notes = [f"{label[model]}: {i.text}" + (f" ({i.where})" if i.where else "")
                     for model, name, i in interpretations if name == metric]
            if notes:
                section.blocks += [Para("Interpretation", "muted"), Items(notes)]
        sections.append(section)
    return sections
