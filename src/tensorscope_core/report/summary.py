"""The executive page: what changed between checkpoints (the change points compare() found and
the largest tested differences), what is notable (the strongest within-model correlations,
with n and the test), and one figure that shows it: the loss and the induction score per
layer against the step, with the change intervals shaded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..results.analysis import Finding
from ..results.schema import HeadValue, LayerValue, ScalarValue
from . import plots
from .blocks import Figure, Heading, Para, Section, Table, ci, num
from .context import Context

TOP = 4
#: drawn first on the executive page when computed: the loss, and the induction score per layer
#: (the maximum over each layer's heads), the signature of in-context learning forming; the
#: per-layer field where the metric has one, else the per-head field's maximum over heads
HEADLINE_LOSS = ("basic.loss", "loss")
HEADLINE_LAYERS = ("circuits.head_scores", "induction_max")
HEADLINE_HEADS = ("circuits.head_scores", "induction")


@dataclass
class Change:
    """A change point of one series: its values either side, and the field's scale (its largest |value|
    over every model, and over every layer of a per-layer field) that sizes it."""

    series: str
    before: str
    after: str
    value_before: float
    value_after: float
    found_by: str
    scale: float

    @property
    def size(self) -> float:
        """The change as a share of the field's scale: a layer whose score moves 0.04 -> 0.02 while
        another moves 0.47 -> 0.99 is a small change, not a halving that outranks the phase change."""
        return abs(self.value_after - self.value_before) / self.scale if self.scale > 0 else 0.0


def _scale(values: Any) -> float:
    """The largest |value| of a (nested) list, None left out."""
    if isinstance(values, list):
        return max((_scale(v) for v in values), default=0.0)
    return abs(float(values)) if values is not None else 0.0


def changes(ctx: Context) -> list[Change]:
    """Every change compare() found in a scalar or a layer's series, the largest share of its field's
    scale first."""
    c = ctx.results.comparisons
    out = []
    for s in c.scalars if c is not None else []:
        for ch in s.changes:
            if ch.model_before in s.models and ch.model_after in s.models:
                a, b = s.values[s.models.index(ch.model_before)], s.values[s.models.index(ch.model_after)]
                if a is not None and b is not None:
                    out.append(Change(f"{s.metric}.{s.field}", ch.model_before, ch.model_after, a, b, ch.found_by,
                                      _scale(s.values)))
    for lt in c.layers if c is not None else []:
        for ch in lt.changes:
            if {ch.model_before, ch.model_after} <= set(lt.models) and ch.label in lt.labels:
                i = lt.labels.index(ch.label)
                a, b = lt.values[lt.models.index(ch.model_before)][i], lt.values[lt.models.index(ch.model_after)][i]
                if a is not None and b is not None:
                    out.append(Change(f"{lt.metric}.{lt.field}[{ch.label}]", ch.model_before, ch.model_after, a, b,
                                      ch.found_by, _scale(lt.values)))
    return sorted(out, key=lambda ch: -ch.size)


def _where(ctx: Context, a: str, b: str) -> str:
    steps = dict(zip(ctx.ordering.names, ctx.ordering.steps, strict=True))
    if steps.get(a) is not None and steps.get(b) is not None:
        return f"step {steps[a]} → {steps[b]}"
    return f"{ctx.label[a]} → {ctx.label[b]}"


def _changed(ctx: Context) -> list[Any]:
    found = changes(ctx)
    blocks: list[Any] = [Heading("What changed")]
    if found:
        top = found[0]
        loss = next((ch for ch in found if ch.series == ".".join(HEADLINE_LOSS)), None)
        said = (f"The loss changed between {_where(ctx, loss.before, loss.after)}: {num(loss.value_before)} → "
                f"{num(loss.value_after)}. ") if loss is not None else ""
        intervals = sorted({(ch.before, ch.after) for ch in found}, key=lambda p: ctx.order.index(p[0]))
        counts = ", ".join(f"{sum(1 for ch in found if (ch.before, ch.after) == p)} between {_where(ctx, *p)}"
                           for p in intervals)
        blocks.append(Para(f"{said}Largest change for its scale: {top.series} went from {num(top.value_before)} to "
                           f"{num(top.value_after)} between {_where(ctx, top.before, top.after)}. "
                           f"{len(found)} change points ({counts}); found by "
                           f"{', '.join(sorted({ch.found_by for ch in found}))}."))
        blocks.append(Table(["series", "where", "before", "after", "change / field's largest value"],
                            [[ch.series, _where(ctx, ch.before, ch.after), num(ch.value_before),
                              num(ch.value_after), f"{100 * ch.size:.0f}%"] for ch in found[:TOP]],
                            f"the {min(TOP, len(found))} largest of {len(found)} change points"))
    c = ctx.results.comparisons
    tested = [(s, d) for s in (c.scalars if c else []) for d in s.differences
              if d.test is not None and d.test.claimed and d.test.significant]
    tested.sort(key=lambda sd: -abs(sd[1].test.cliffs_delta or 0.0) if sd[1].test else 0.0)
    if tested:
        blocks.append(Table(["value", "pair", "mean diff (b − a)", "95% CI", "test", "p (BH)", "Cliff's δ"],
                            [[f"{s.metric}.{s.field}", f"{ctx.label[d.a]} → {ctx.label[d.b]}",
                              num(d.test.mean_difference), ci(d.test.ci_low, d.test.ci_high),
                              f"{d.test.test} (n={d.test.n})", num(d.test.p_adjusted, 3), num(d.test.cliffs_delta, 3)]
                             for s, d in tested[:TOP - 1] if d.test is not None],
                            f"the largest of {len(tested)} significant differences on per-example values"))
    elif c is not None:
        total = sum(len(s.differences) for s in c.scalars)
        untested = sum(1 for s in c.scalars for d in s.differences if d.test is None)
        blocks.append(Para(f"No difference between models was both tested and significant ({total} pairs: "
                           f"{untested} without per-example values, the others below min_n={c.min_n} examples "
                           f"or not significant after BH).", "muted"))
    if not found and c is None:
        blocks.append(Para("One model: nothing to compare.", "muted"))
    return blocks


def _notable(ctx: Context) -> list[Any]:
    found: list[Finding] = [f for d in ctx.results.correlations.values() for f in d.significant]
    within = sorted([f for f in found if f.groups is not None], key=lambda f: -abs(f.r or 0.0))
    shown = within or sorted(found, key=lambda f: -abs(f.r or 0.0))
    blocks: list[Any] = [Heading("What is notable")]
    if not shown:
        tested = sum(len(d.findings) for d in ctx.results.correlations.values())
        blocks.append(Para(f"No correlation survived the FDR correction ({tested} pairs tested)." if tested else
                           "No correlation could be tested (too few observations; see the appendix).", "muted"))
        return blocks
    kind = "within-model" if within else "pooled"
    units = ", ".join(sorted({f.unit for f in shown[:TOP - 1]}))
    blocks.append(Table(["x", "y", "r", "95% CI", "n (models)", "p (BH)"],
                        [[f.x, f.y, num(f.r, 3), ci(f.ci_low, f.ci_high),
                          f"{f.n} ({f.groups})" if f.groups else f.n, num(f.p_adjusted, 3)] for f in shown[:TOP - 1]],
                        f"the strongest {kind} correlations (unit: {units}) of {len(found)} significant (FDR "
                        f"{next(iter(ctx.results.correlations.values())).fdr}). Test: "
                        + "; ".join(sorted({f.test for f in shown[:TOP - 1]}))))
    return blocks


def _series(ctx: Context, metric: str, name: str) -> dict[str, Any]:
    models = {m.name: m for m in ctx.results.record.models}
    out = {}
    for model in ctx.order:
        result = models[model].metrics.get(metric)
        if result is not None and result.ok and name in result.values:
            out[model] = result.values[name]
    return out


def _values(ctx: Context, metric: str, name: str) -> list[float | None]:
    """A scalar's values per model, or one entry of a per-layer field (``name`` ``field[label]``)."""
    field, _, label = name.partition("[")
    out: list[float | None] = []
    for value in (_series(ctx, metric, field).get(m) for m in ctx.order):
        if isinstance(value, ScalarValue) and not label:
            out.append(value.value)
        elif isinstance(value, LayerValue) and label:
            out.append(dict(zip(value.keys(), value.values, strict=True)).get(label.rstrip("]")))
        else:
            out.append(None)
    return out


def _headline(ctx: Context) -> list[Any]:
    """Loss, induction per layer and the two largest other changes against the step."""
    if not ctx.series:
        return []
    x, xlabel = ctx.axis
    biggest = changes(ctx)
    shade_all = [(ctx.x_of(biggest[0].before), ctx.x_of(biggest[0].after))] if biggest else []
    items = []
    loss = _series(ctx, *HEADLINE_LOSS)
    if loss and all(isinstance(v, ScalarValue) for v in loss.values()):
        get = [loss.get(m) for m in ctx.order]
        items.append(plots.Panel(".".join(HEADLINE_LOSS), x, [plots.Line(
            "loss", [v.value if v else None for v in get], [v.ci_low if v else None for v in get],
            [v.ci_high if v else None for v in get])], xlabel, spans=ctx.shaded(*HEADLINE_LOSS) or shade_all))
    heads = _series(ctx, *HEADLINE_LAYERS) or _series(ctx, *HEADLINE_HEADS)
    if heads and all(isinstance(v, HeadValue | LayerValue) for v in heads.values()):
        per_layer = {m: np.nanmax(np.array(v.values, dtype=np.float64), axis=-1) if isinstance(v, HeadValue)
                     else np.array(v.values, dtype=np.float64) for m, v in heads.items()}
        n_layers = max(len(v) for v in per_layer.values())
        lines = [plots.Line(f"layer {i}", [float(per_layer[m][i]) if m in per_layer and i < len(per_layer[m])
                                           else None for m in ctx.order]) for i in range(n_layers)]
        spans = [s for i in range(n_layers) for s in ctx.shaded(HEADLINE_LAYERS[0], f"{HEADLINE_LAYERS[1]}[{i}]")]
        items.append(plots.Panel("induction score per layer (max over heads)", x, lines, xlabel,
                                 spans=spans or shade_all))
    headline = {".".join(HEADLINE_LOSS)}
    for ch in biggest:
        if len(items) >= 4:
            break
        if ch.series in headline:
            continue
        headline.add(ch.series)
        metric, name = ch.series.rsplit(".", 1)
        items.append(plots.Panel(ch.series, x, [plots.Line(name, _values(ctx, metric, name))], xlabel,
                                 spans=ctx.shaded(metric, name)))
    if not items:
        return []
    return [Figure(plots.panels(items, f"The run at a glance, by {xlabel}: loss, induction score per layer and the "
                                       "largest changes; shaded: where a change was found.", cols=4))]


def _run_line(ctx: Context) -> Para:
    record = ctx.results.record
    first = record.models[0] if record.models else None
    steps = [s for s in ctx.ordering.steps if s is not None]
    span = f" at steps {steps[0]}–{steps[-1]}" if ctx.series and steps else ""
    dims = (f" ({first.family}, {first.dims.get('n_layers', '?')} layers, d_model {first.dims.get('d_model', '?')})"
            if first else "")
    status = [r.status for m in record.models for r in m.metrics.values()] + [
        r.status for r in record.model_set.values()]
    return Para(f"{len(record.models)} model(s){span}{dims}; {len(status)} results: {status.count('ok')} ok, "
                f"{status.count('error')} error, {status.count('skipped')} skipped (reasons in the appendix).")


def summary(ctx: Context) -> Section:
    section = Section("summary", "Summary")
    section.blocks.append(_run_line(ctx))
    section.blocks += _headline(ctx)
    section.blocks += _changed(ctx)
    section.blocks += _notable(ctx)
    return section
