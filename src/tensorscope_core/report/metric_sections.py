"""One section per plugin (metric family), with the few figures that carry information: the
scalars and per-layer values that change across checkpoints (CI as bands, x spaced by step,
changes shaded), the per-head field that changes most on one colour scale for every
checkpoint, the spectrum that changes most; a table of the scalars. Constant and bookkeeping
fields, tensors and the rest are named in the appendix; every value is in results.json."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..results.schema import HeadValue, LayerValue, MetricResult, ScalarValue, SeriesValue, TableValue, TextValue
from . import plots
from .blocks import Figure, Heading, Items, Para, Section, Table, num
from .context import Context
from .selection import bookkeeping, changes, ci_bound, evenly, relative_change
from .summary import HEADLINE_HEADS, HEADLINE_LAYERS, HEADLINE_LOSS

PANELS = 4  # panels per trajectory figure (one row)
HEAD_FIGURES = 2  # per-head heatmap figures per family
TABLE_COLUMNS = 8  # checkpoints shown as columns of a family's scalar table (evenly chosen)
TABLE_ROWS = 30
SMALL_TABLE = (12, 7)  # tables of values shown (rows, columns), on the latest model
READINGS = 8  # readings listed in a family section (all of them in the appendix)
LAYER_LINES = 6  # per-layer values: one line per layer over steps up to this many layers, else per checkpoint


@dataclass
class Candidate:
    """A field that could be drawn, with how much it changes (larger first)."""

    metric: str
    field: str
    per_model: dict[str, Any]
    score: float


def _ok_results(ctx: Context, metric: str) -> dict[str, MetricResult]:
    models = {m.name: m for m in ctx.results.record.models}
    out = {}
    for name in ctx.order:
        result = models[name].metrics.get(metric)
        if result is not None and result.ok:
            out[name] = result
    return out


def _arrays(per_model: Mapping[str, Any]) -> list[np.ndarray]:
    out = []
    for value in per_model.values():
        raw = value.value if isinstance(value, ScalarValue) else value.values
        out.append(np.array(raw, dtype=np.float64) if raw is not None else np.array(np.nan))
    return out


def _candidates(ctx: Context, family: str, metrics: Sequence[str], kind: type) -> list[Candidate]:
    """Fields of ``kind`` that change across the checkpoints (or vary, for one model), best first;
    the others are recorded as left out with the reason."""
    found, constant, counts = [], [], []
    for metric in metrics:
        ok = _ok_results(ctx, metric)
        fields = list(dict.fromkeys(f for r in ok.values() for f, v in r.values.items() if isinstance(v, kind)))
        for name in fields:
            if ci_bound(name):
                continue
            if bookkeeping(name):
                counts.append(f"{metric}.{name}")
                continue
            per_model = {m: r.values[name] for m, r in ok.items() if isinstance(r.values.get(name), kind)}
            arrays = _arrays(per_model)
            if len(arrays) > 1:
                score = relative_change(arrays)
                moving = changes(arrays)
            else:
                score = float(np.nanstd(arrays[0])) if np.isfinite(arrays[0]).any() else 0.0
                moving = kind is not ScalarValue and score > 0
            if not moving:
                constant.append(f"{metric}.{name}")
                continue
            marked = any(key[0] == metric and key[1].split("[")[0] == name for key in ctx.spans)
            headline = (metric, name) in (HEADLINE_LOSS, HEADLINE_LAYERS, HEADLINE_HEADS)
            found.append(Candidate(metric, name, per_model, score + (10.0 if marked else 0.0)
                                   + (100.0 if headline else 0.0)))
    ctx.leave_out(family, "constant across the models (not drawn)", constant)
    ctx.leave_out(family, "bookkeeping: counts, sizes, iterations (in results.json)", counts)
    return sorted(found, key=lambda c: -c.score)


def _band(ctx: Context, c: Candidate, which: str) -> list[float | None]:
    """A field's CI bound per model: a scalar's own ci_low/ci_high."""
    return [getattr(c.per_model[m], which) if m in c.per_model else None for m in ctx.order]


def _scalar_figure(ctx: Context, family: str, found: list[Candidate]) -> list[Any]:
    shown = found[:PANELS]
    ctx.leave_out(family, f"changing scalars beyond the {PANELS} drawn (in the table)",
                  [f"{c.metric}.{c.field}" for c in found[PANELS:]])
    if not shown or not ctx.series:
        return []
    x, xlabel = ctx.axis
    items = [plots.Panel(f"{c.metric}.{c.field}", x, [plots.Line(
        c.field, [c.per_model[m].value if m in c.per_model else None for m in ctx.order],
        _band(ctx, c, "ci_low"), _band(ctx, c, "ci_high"))], xlabel, spans=ctx.shaded(c.metric, c.field))
             for c in shown]
    shaded = " Shaded: a change found between two checkpoints." if any(p.spans for p in items) else ""
    return [Figure(plots.panels(items, f"{family}: the scalars that change most, by {xlabel} (band: 95% CI)."
                                + shaded, cols=PANELS))]


def _layer_ci(ctx: Context, metric: str, name: str, model: str, which: str) -> list[float | None] | None:
    result = _ok_results(ctx, metric).get(model)
    bound = result.values.get(f"{name}_ci_{which}") if result is not None else None
    return list(bound.values) if isinstance(bound, LayerValue) else None


def _layer_panel(ctx: Context, c: Candidate) -> plots.Panel:
    first = next(iter(c.per_model.values()))
    labels = first.labels or [str(i) for i in range(len(first.values))]
    title = f"{c.metric}.{c.field}"
    if ctx.series and len(labels) <= LAYER_LINES:  # one line per layer, over steps
        x, xlabel = ctx.axis
        lines = [plots.Line(f"layer {label}", [c.per_model[m].values[i] if m in c.per_model and
                                               i < len(c.per_model[m].values) else None for m in ctx.order])
                 for i, label in enumerate(labels)]
        spans = [s for label in labels for s in ctx.shaded(c.metric, f"{c.field}[{label}]")]
        return plots.Panel(title, x, lines, xlabel, spans=spans)
    models = evenly(list(c.per_model), 6)
    lines = [plots.Line(ctx.label[m], c.per_model[m].values, _layer_ci(ctx, c.metric, c.field, m, "low"),
                        _layer_ci(ctx, c.metric, c.field, m, "high")) for m in models]
    return plots.Panel(title, list(range(len(labels))), lines, "layer", ticks=labels)


def _layer_figure(ctx: Context, family: str, found: list[Candidate]) -> list[Any]:
    shown = found[:PANELS]
    ctx.leave_out(family, f"changing per-layer fields beyond the {PANELS} drawn",
                  [f"{c.metric}.{c.field}" for c in found[PANELS:]])
    if not shown:
        return []
    items = [_layer_panel(ctx, c) for c in shown]
    return [Figure(plots.panels(items, f"{family}: the per-layer values that change most"
                                + (" (band: 95% CI)" if any(line.low for p in items for line in p.lines) else ""),
                                cols=PANELS))]


def _head_figures(ctx: Context, family: str, found: list[Candidate]) -> list[Any]:
    ctx.leave_out(family, f"per-head fields beyond the {HEAD_FIGURES} drawn",
                  [f"{c.metric}.{c.field}" for c in found[HEAD_FIGURES:]])
    return [Figure(plots.heatmaps({ctx.label[m]: v.values for m, v in c.per_model.items()},
                                  f"{c.metric}.{c.field} per head: one colour scale for every checkpoint "
                                  f"(fixed at [0, 1] / [-1, 1] where the values lie inside it)", label=c.field))
            for c in found[:HEAD_FIGURES]]


def _series_figure(ctx: Context, family: str, found: list[Candidate]) -> list[Any]:
    ctx.leave_out(family, "series beyond the one drawn", [f"{c.metric}.{c.field}" for c in found[1:]])
    if not found:
        return []
    c = found[0]
    models = evenly(list(c.per_model), 6)
    return [Figure(plots.series_lines({ctx.label[m]: c.per_model[m].values for m in models},
                                      f"{c.metric}.{c.field}", c.per_model[models[0]].index_name))]


def _scalar_table(ctx: Context, metrics: Sequence[str]) -> list[Any]:
    """One row per scalar field, one column per checkpoint (at most TABLE_COLUMNS, evenly chosen)."""
    shown = evenly(ctx.order, TABLE_COLUMNS)
    rows = []
    for metric in metrics:
        ok = _ok_results(ctx, metric)
        fields = list(dict.fromkeys(f for r in ok.values() for f, v in r.values.items()
                                    if isinstance(v, ScalarValue) and not ci_bound(f) and not bookkeeping(f)))
        for name in fields:
            cells = [ok[m].values.get(name) if m in ok else None for m in shown]
            rows.append([f"{metric}.{name}"] + [num(v.value) if isinstance(v, ScalarValue) else "" for v in cells])
    if not rows:
        return []
    caption = "scalar values per checkpoint (95% CIs drawn as bands in the figures; all in results.json)"
    if len(shown) < len(ctx.order):
        caption += f"; {len(shown)} of {len(ctx.order)} checkpoints shown"
    if len(rows) > TABLE_ROWS:
        caption += f"; first {TABLE_ROWS} of {len(rows)} fields"
    return [Table(["field"] + [ctx.label[m] for m in shown], rows[:TABLE_ROWS], caption, wide=len(shown) > 5)]


def _texts_and_tables(ctx: Context, family: str, metrics: Sequence[str]) -> list[Any]:
    """Text fields (grouped where models agree) and small tables on the latest model."""
    blocks: list[Any] = []
    texts: list[str] = []
    big: list[str] = []
    for metric in metrics:
        ok = _ok_results(ctx, metric)
        if not ok:
            continue
        latest = list(ok)[-1]
        for name, value in ok[latest].values.items():
            if isinstance(value, TextValue):
                same = all(getattr(r.values.get(name), "text", None) == value.text for r in ok.values())
                where = "every model" if same and len(ok) > 1 else ctx.label[latest]
                texts.append(f"{metric}.{name} ({where}): {value.text[:300]}")
            elif isinstance(value, TableValue):
                rows, cols = SMALL_TABLE
                if 0 < len(value.rows) <= rows and len(value.columns) <= cols:
                    blocks.append(Table(list(value.columns), [[num(v) for v in r] for r in value.rows],
                                        f"{metric}.{name} on {ctx.label[latest]}"))
                else:
                    big.append(f"{metric}.{name}")
    ctx.leave_out(family, "tables too large for a page (in results.json)", big)
    return ([Items(texts, "muted")] if texts else []) + blocks


def _interpretations(ctx: Context, metrics: Sequence[str]) -> list[Any]:
    """The metrics' readings, each once, with the models it holds for."""
    grouped: dict[str, list[str]] = {}
    for model, metric, reading in ctx.interpretations:
        if metric in metrics:
            text = f"{metric}: {reading.text}" + (f" ({reading.where})" if reading.where else "")
            grouped.setdefault(text, []).append(ctx.label.get(model, model))
    if not grouped:
        return []
    n = len(ctx.order)
    lines = [f"{text} — {'every model' if len(m) == n > 1 else ', '.join(m)}" for text, m in grouped.items()]
    more = [Para(f"and {len(lines) - READINGS} more in the appendix", "muted")] if len(lines) > READINGS else []
    return [Heading("Readings"), Items(lines[:READINGS])] + more


def _run_table(ctx: Context, plugin: str) -> list[Any]:
    """The plugin's model-set scalars (one value for the whole run)."""
    rows = [[f"{metric}.{name}", num(v.value)] for metric, r in ctx.results.record.model_set.items()
            if r.ok and r.plugin == plugin for name, v in r.values.items()
            if isinstance(v, ScalarValue) and not ci_bound(name) and not bookkeeping(name)]
    return [Table(["field", "value"], rows[:TABLE_ROWS], "computed once over all the models")] if rows else []


def _family_section(ctx: Context, plugin: str, metrics: list[str]) -> Section:
    family = plugin.removeprefix("tensorscope-")
    section = Section(f"plugin-{plugin}", f"Family: {family}", flow=True)
    ok = [m for m in metrics if _ok_results(ctx, m)]
    lines = [f"{m}: {ctx.describe.get(m, {}).get('summary') or ''}".rstrip(": ") for m in ok]
    failed = len(metrics) - len(ok)
    section.blocks.append(Para(f"{len(ok)} metric(s) computed" + (
        f"; {failed} skipped or failed on every model (reasons in the appendix)" if failed else "") + ".", "muted"))
    if lines:
        section.blocks.append(Items(lines, "muted"))
    section.blocks += _scalar_figure(ctx, plugin, _candidates(ctx, plugin, ok, ScalarValue))
    section.blocks += _layer_figure(ctx, plugin, _candidates(ctx, plugin, ok, LayerValue))
    section.blocks += _head_figures(ctx, plugin, _candidates(ctx, plugin, ok, HeadValue))
    section.blocks += _series_figure(ctx, plugin, _candidates(ctx, plugin, ok, SeriesValue))
    section.blocks += _scalar_table(ctx, ok)
    section.blocks += _run_table(ctx, plugin)
    section.blocks += _texts_and_tables(ctx, plugin, ok)
    section.blocks += _interpretations(ctx, ok)
    return section


def metric_sections(ctx: Context) -> list[Section]:
    """One section per plugin with a result (its model-set scalars as a table; their other
    fields in the plugins' own sections and in results.json)."""
    plugins: dict[str, list[str]] = {}
    for model in ctx.results.record.models:
        for metric, result in model.metrics.items():
            plugins.setdefault(result.plugin, [])
            if metric not in plugins[result.plugin]:
                plugins[result.plugin].append(metric)
    for result in ctx.results.record.model_set.values():
        plugins.setdefault(result.plugin, [])
    sections = []
    for plugin, metrics in plugins.items():
        if any(_ok_results(ctx, m) for m in metrics) or _run_table(ctx, plugin):
            sections.append(_family_section(ctx, plugin, metrics))
    return sections
