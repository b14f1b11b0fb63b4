"""The comparison section, as tables of what was claimed: the changes between checkpoints,
the significant differences and trends, the early indicators; what could not be tested is
said once (which metrics, why). The trajectories themselves are drawn in the family sections."""

from __future__ import annotations

from collections.abc import Mapping

from ..results.analysis import Comparisons
from ..stats import Difference, Trend
from .blocks import Heading, Para, Section, Table, ci, num

ROWS = 10  # rows of a claims table; the rest are in the report JSON


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


def untested_sentence(c: Comparisons) -> str:
    """One sentence for every difference that had no per-example values to test."""
    metrics = sorted({s.metric for s in c.scalars for d in s.differences if d.test is None})
    if not metrics:
        return ""
    return (f"No per-example values, so differences between models were not tested (values only, in the "
            f"report JSON): {', '.join(metrics)}.")


def _differences(c: Comparisons, label: Mapping[str, str]) -> list[object]:
    tested = [(s, d) for s in c.scalars for d in s.differences if d.test is not None]
    claimed = sorted([(s, d) for s, d in tested if d.test is not None and d.test.claimed],
                     key=lambda sd: not (sd[1].test is not None and sd[1].test.significant))
    blocks: list[object] = [Heading("Differences tested on per-example values")]
    if claimed:
        rows, note = _capped([[f"{s.metric}.{s.field}", f"{label[d.a]} → {label[d.b]}", num(d.test.mean_difference),
                               ci(d.test.ci_low, d.test.ci_high), f"{d.test.test} (n={d.test.n})",
                               num(d.test.p_adjusted, 3), num(d.test.cohen_d, 3), num(d.test.cliffs_delta, 3),
                               _verdict(d.test)] for s, d in claimed if d.test is not None])
        blocks.append(Table(
            ["value", "pair", "mean diff (b − a)", "95% CI", "test", "p (BH)", "Cohen's d", "Cliff's δ", "verdict"],
            rows, note, wide=True))
    significant = sum(1 for _, d in claimed if d.test is not None and d.test.significant)
    below = len(tested) - len(claimed)
    blocks.append(Para(f"{len(tested)} pairs tested, {significant} significant"
                       + (f"; {below} with fewer examples than min_n={c.min_n}: not claimed" if below else "")
                       + ".", "muted"))
    sentence = untested_sentence(c)
    if sentence:
        blocks.append(Para(sentence, "muted"))
    return blocks


def _changes(c: Comparisons, label: Mapping[str, str]) -> list[object]:
    """The changes found, one row per interval and method, naming every series that changed there."""
    grouped: dict[tuple[str, str, str], list[str]] = {}
    spans = [(f"{s.metric}.{s.field}", ch) for s in c.scalars for ch in s.changes]
    spans += [(f"{lt.metric}.{lt.field}[{ch.label}]", ch) for lt in c.layers for ch in lt.changes]
    for series, ch in spans:
        grouped.setdefault((ch.model_before, ch.model_after, ch.found_by), []).append(series)
    if not grouped:
        return []
    names = c.order.names
    rows = [[f"{label.get(a, a)} → {label.get(b, b)}", by, len(series), ", ".join(series)]
            for (a, b, by), series in sorted(grouped.items(), key=lambda kv: names.index(kv[0][0])
                                              if kv[0][0] in names else 0)]
    return [Heading("Changes between checkpoints"), Table(["between", "found by", "series", "which"], rows)]


def _capped(rows: list[list[object]]) -> tuple[list[list[object]], str]:
    return rows[:ROWS], (f"first {ROWS} of {len(rows)}; all in the report JSON" if len(rows) > ROWS else "")


def comparison_section(c: Comparisons, label: Mapping[str, str]) -> Section:
    section = Section("comparisons", "Comparisons across models")
    section.blocks.append(Para(f"{_order_text(c)} Tests: BH-corrected at {c.alpha} per family (differences, "
                               f"trends, early indicators); floor min_n={c.min_n} examples, "
                               f"{c.trend_min_n} checkpoints for trends. Highest and lowest model per field, and "
                               f"every value, are in the report JSON."))
    section.blocks += _changes(c, label)
    section.blocks += _differences(c, label)
    trends = [s for s in c.scalars if s.trend is not None]
    claimed = [s for s in trends if s.trend is not None and s.trend.significant]
    if trends:
        section.blocks.append(Heading("Trends across checkpoints (Kendall's tau against order)"))
        if claimed:
            rows, note = _capped([[f"{s.metric}.{s.field}", num(s.trend.tau, 3), s.trend.direction, s.trend.n,
                                   num(s.trend.p_adjusted, 3)] for s in claimed if s.trend])
            section.blocks.append(Table(["value", "tau", "direction", "n", "p (BH)"], rows, note))
        unclaimed = {_verdict(s.trend) for s in trends if s not in claimed}
        section.blocks.append(Para(f"{len(trends)} scalar series tested, {len(claimed)} significant"
                                   + (f"; the others: {'; '.join(sorted(unclaimed))}" if unclaimed else "") + ".",
                                   "muted"))
    layer_trends = sorted([(t.p_adjusted or 0.0, f"{lt.metric}.{lt.field}[{lab}]", t) for lt in c.layers
                           for lab, t in zip(lt.labels, lt.trends, strict=True) if t.significant],
                          key=lambda item: item[0])
    if layer_trends:
        rows, note = _capped([[name, num(t.tau, 3), t.direction, num(t.p_adjusted, 3)]
                              for _, name, t in layer_trends])
        section.blocks += [Heading("Significant per-layer trends"),
                           Table(["series", "tau", "direction", "p (BH)"], rows, note)]
    if c.early_indicators:
        shown = [e for e in c.early_indicators if e.stat.claimed and e.stat.significant]
        section.blocks.append(Heading("Early indicators"))
        if shown:
            section.blocks.append(Table(["value", "at", "predicts", "rho", "95% CI", "n", "p (BH)"], [
                [f"{e.metric}.{e.field}", label.get(e.early, e.early) if e.early else "(each model)",
                 "final value" if e.target == "final" else "outcome", num(e.stat.r, 3),
                 ci(e.stat.ci_low, e.stat.ci_high), e.stat.n, num(e.stat.p_adjusted, 3)] for e in shown]))
        section.blocks.append(Para(f"{len(c.early_indicators)} tested, {len(shown)} significant.", "muted"))
    return section
