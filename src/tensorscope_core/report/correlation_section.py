"""The correlation section: per unit of analysis, the matrix with significant cells marked,
the findings with their statistics, scatters of the strongest, and what was not claimed."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..discovery import collect
from ..results.analysis import Discovery, ModelOrder
from ..results.schema import RunRecord
from . import plots
from .blocks import Figure, Heading, Para, Section, Table, ci, num

MAX_ROWS = 12
SCATTERS = 1


def _matrix(d: Discovery) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """r of the tested pairs (NaN elsewhere), the significant cells, the excluded cells."""
    index = {v: i for i, v in enumerate(d.variables)}
    k = len(d.variables)
    r = np.full((k, k), np.nan)
    np.fill_diagonal(r, 1.0)
    significant = np.zeros((k, k), dtype=bool)
    excluded = np.eye(k, dtype=bool)
    for f in d.findings:
        i, j = index[f.x], index[f.y]
        r[i, j] = r[j, i] = f.r if f.r is not None else np.nan
        significant[i, j] = significant[j, i] = f.significant
    for e in d.excluded:
        i, j = index[e.x], index[e.y]
        excluded[i, j] = excluded[j, i] = True
    return r, significant, excluded


UNIT_TEXT = {"layer": "one observation per model and layer", "head": "one per model, layer and head",
             "model": "one scalar per model", "checkpoint": "changes between consecutive checkpoints"}


def _not_claimed(d: Discovery) -> list[object]:
    below = [f for f in d.not_claimed if f.reason and "min_n" in f.reason]
    other = [f for f in d.not_claimed if not (f.reason and "min_n" in f.reason)]  # one pass, not n^2 comparisons
    blocks: list[object] = []
    if below:
        blocks.append(Para(f"{len(below)} pairs have fewer than min_n={d.min_n} observations (largest n="
                           f"{max(f.n for f in below)}): not claimed. Lower min_n only with a reason; the "
                           f"descriptive r of each is in the report JSON.", "warning"))
    reasons: dict[str, int] = {}
    for f in other:
        reasons[f.reason or "not tested"] = reasons.get(f.reason or "not tested", 0) + 1
    if reasons:
        blocks.append(Table(["why not tested", "pairs"], [[why, n] for why, n in reasons.items()]))
    return blocks


def _unit_blocks(record: RunRecord, d: Discovery, order: ModelOrder, label: Mapping[str, str]) -> list[object]:
    blocks: list[object] = [Heading(f"Unit: {d.unit}"), Para(
        f"{len(d.variables)} variables ({UNIT_TEXT[d.unit]}); {d.method}, Benjamini-Hochberg FDR {d.fdr}, "
        f"floor min_n={d.min_n}. {len(d.findings)} pairs tested, {len(d.significant)} significant, "
        f"{len(d.not_claimed)} not claimed, {len(d.excluded)} never paired (same metric or declared derivation)."
        + "".join(f" Test: {t}." for t in sorted({f.test for f in d.findings})))]
    if d.findings and len(d.variables) <= plots.TICKS_MAX:
        r, significant, excluded = _matrix(d)
        blocks.append(Figure(plots.correlation_matrix(
            d.variables, r, significant, excluded,
            f"{d.method} r over unit '{d.unit}'; * significant after FDR, × never paired (same metric or "
            f"derived), blank: not tested")))
    elif d.findings:
        blocks.append(Para(f"{len(d.variables)} variables: too many for a readable matrix; the strongest pairs "
                           f"are listed, every pair is in the report JSON.", "muted"))
    if d.findings:
        blocks.append(Table(["x", "y", "r", "95% CI", "n", "p", "p (BH)", "significant"],
                            [[f.x, f.y, num(f.r, 3), ci(f.ci_low, f.ci_high), f.n, num(f.p, 3),
                              num(f.p_adjusted, 3), num(f.significant)] for f in d.findings[:MAX_ROWS]],
                            caption="tested pairs, strongest first" + (
                                f" (first {MAX_ROWS} of {len(d.findings)})" if len(d.findings) > MAX_ROWS else ""),
                            wide=True))
    top = d.significant[:SCATTERS]
    if top:
        variables = collect(record, d.unit, order)
        for f in top:
            x, y = variables[f.x], variables[f.y]
            keys = sorted(set(x.values) & set(y.values))
            blocks.append(Figure(plots.scatter([x.values[k] for k in keys], [y.values[k] for k in keys],
                                               f"{f.y} against {f.x} (r={num(f.r, 3)}, n={f.n})", xlabel=f.x,
                                               ylabel=f.y, groups=[label.get(k[0], k[0]) for k in keys])))
    blocks += _not_claimed(d)
    return blocks


def correlation_section(record: RunRecord, discoveries: list[Discovery], order: ModelOrder,
                        label: Mapping[str, str]) -> Section:
    section = Section("correlations", "Correlations between metrics")
    if not discoveries:
        section.blocks.append(Para("No unit of analysis had two or more variables to correlate.", "muted"))
    for d in discoveries:
        section.blocks += _unit_blocks(record, d, order, label)
    return section
