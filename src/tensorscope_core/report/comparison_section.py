"""The comparison section: highest/lowest per metric, differences with significance,
trajectories and trends across checkpoints, early indicators."""

from __future__ import annotations

from collections.abc import Mapping

from ..results.analysis import Comparisons
from ..stats import Difference, Trend
from . import plots
from .blocks import Figure, Heading, Items, Para, Section, Table, ci, num

PANELS_PER_FIGURE = 9


def _verdict(stat: Difference | Trend | None) -> str:
    if stat is None:
        return ""
    if not stat.claimed:
        return stat.reason or "not claimed"
    return "significant" if stat.significant else "n.s."


def _order_text(c: Comparisons) -> str:
    if c.order.ordered_by == "step":
        return "Models are checkpoints, ordered by the step in their names."
    if c.order.ordered_by == "explicit":
        return "Models are checkpoints, in the order given."
    return "Models in the order given (no step in their names): compared pairwise."


def _differences(c: Comparisons, label: Mapping[str, str]) -> list[object]:
    """Tested differences in full; untested ones (no per-example values) as values only."""
    tested, untested = [], []
    for s in c.scalars:
        for d in s.differences:
            pair = f"{label[d.a]} → {label[d.b]}"
            t = d.test
            if t is None:
                untested.append([f"{s.metric}.{s.field}", pair, num(d.value_a), num(d.value_b), num(d.difference),
                                 d.note or ""])
            else:
                tested.append([f"{s.metric}.{s.field}", pair, num(t.mean_difference), ci(t.ci_low, t.ci_high),
                               f"{t.test} (n={t.n})", num(t.p, 3), num(t.p_adjusted, 3), num(t.cohen_d, 3),
                               num(t.cliffs_delta, 3), _verdict(t)])
    blocks: list[object] = []
    if tested:
        blocks += [Heading("Differences tested on per-example values"), Table(
            ["value", "pair", "mean diff (b − a)", "95% CI", "test", "p", "p (BH)", "Cohen's d", "Cliff's δ",
             "verdict"], tested)]
    if untested:
        blocks += [Heading("Differences without per-example values (not tested)"), Table(
            ["value", "pair", "a", "b", "b − a", "note"], untested)]
    return blocks


def comparison_section(c: Comparisons, label: Mapping[str, str]) -> Section:
    section = Section("comparisons", "Comparisons across models")
    names = c.order.names
    xlabels = [label[n] for n in names]
    section.blocks.append(Para(f"{_order_text(c)} Tests: BH-corrected at {c.alpha} per family (differences, "
                               f"trends, early indicators); floor min_n={c.min_n} examples, "
                               f"{c.trend_min_n} checkpoints for trends."))
    scalars = [s for s in c.scalars if sum(v is not None for v in s.values) >= 1]
    for start in range(0, len(scalars), PANELS_PER_FIGURE):
        chunk = scalars[start:start + PANELS_PER_FIGURE]
        panels = {f"{s.metric}.{s.field}": (s.values, s.ci_low, s.ci_high) for s in chunk}
        spans = {f"{s.metric}.{s.field}": [(names.index(ch.model_before), names.index(ch.model_after))
                                           for ch in s.changes if {ch.model_before, ch.model_after} <= set(names)]
                 for s in chunk}
        kind = "trajectories across checkpoints" if c.order.is_series else "values per model"
        marked = "; shaded: a change found between two checkpoints" if any(spans.values()) else ""
        section.blocks.append(Figure(plots.scalar_panels(names, panels,
                                                         f"Scalar metrics: {kind} (band/bars: 95% CI{marked})",
                                                         trajectory=c.order.is_series, xlabels=xlabels, spans=spans)))
    changes = [[f"{s.metric}.{s.field}", label.get(ch.model_before, ch.model_before),
                label.get(ch.model_after, ch.model_after), ch.found_by] for s in c.scalars for ch in s.changes]
    changes += [[f"{lt.metric}.{lt.field}[{ch.label}]", label.get(ch.model_before, ch.model_before),
                 label.get(ch.model_after, ch.model_after), ch.found_by] for lt in c.layers for ch in lt.changes]
    if changes:
        section.blocks += [Heading("Changes between checkpoints"),
                           Table(["series", "from checkpoint", "to checkpoint", "found by"], changes)]
    summary = c.summary()
    if summary:
        section.blocks += [Heading("Highest and lowest"),
                           Table(["metric", "field", "highest", "lowest"],
                                 [[s["metric"], s["field"], label.get(s["highest"] or "", s["highest"]),
                                   label.get(s["lowest"] or "", s["lowest"])] for s in summary])]
    section.blocks += _differences(c, label)
    trends = [[f"{s.metric}.{s.field}", num(s.trend.tau, 3), s.trend.direction, s.trend.n, num(s.trend.p, 3),
               num(s.trend.p_adjusted, 3), _verdict(s.trend)] for s in c.scalars if s.trend is not None]
    if trends:
        section.blocks += [Heading("Trends across checkpoints (Kendall's tau against order)"),
                           Table(["value", "tau", "direction", "n", "p", "p (BH)", "verdict"], trends)]
    for lt in c.layers:
        section.blocks.append(Figure(plots.trajectory_heatmap(lt.labels, [label[m] for m in lt.models], lt.values,
                                                              f"{lt.metric}.{lt.field}: per layer across checkpoints")))
        claimed = [f"layer {label}: tau {num(t.tau, 3)}, p (BH) {num(t.p_adjusted, 3)}"
                   for label, t in zip(lt.labels, lt.trends, strict=True) if t.significant]
        if claimed:
            section.blocks.append(Items(claimed))
    if c.early_indicators:
        rows = []
        for e in c.early_indicators:
            verdict = ("significant" if e.stat.significant else "n.s.") if e.stat.claimed else (e.stat.reason or "")
            rows.append([f"{e.metric}.{e.field}", label.get(e.early, e.early) if e.early else "(each model)",
                         "final value" if e.target == "final" else "outcome", num(e.stat.r, 3),
                         ci(e.stat.ci_low, e.stat.ci_high), e.stat.n, num(e.stat.p_adjusted, 3), verdict])
        section.blocks += [Heading("Early indicators"),
                           Table(["value", "at", "predicts", "rho", "95% CI", "n", "p (BH)", "verdict"], rows)]
    if c.warnings:
        section.blocks.append(Items(c.warnings, "warning"))
    return section
