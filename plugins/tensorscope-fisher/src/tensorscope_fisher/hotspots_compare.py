"""fisher.hotspots_compare: the FIM hotspots of several models (checkpoints, fine-tunes) side by side."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from tensorscope_core.plugin_api import (
    MetricResult,
    ModelSetMetric,
    ModelView,
    NoParams,
    ScalarValue,
    SeriesValue,
    TableValue,
    TextValue,
    correlation,
)

from .hotspots import GLOBAL_STATS
from .hotspots_rules import CATEGORIES


class HotspotsCompare(ModelSetMetric):
    """``fisher.hotspots`` across the models of a run, in the order given (for checkpoints: by step).

    - ``table``: every model's tall table ``run_name, layer, head, metric, value`` joined.
    - ``global``: one row per model with its global statistics (``fisher.hotspots`` scalars).
    - Where the models have the same layer x head grid: ``category_changes`` (layer, head, the
      category in each model, whether it changed), ``category_agreement`` (share of heads whose
      category is the same in every model) and ``trace_rank_correlation`` (Spearman ρ of the heads'
      traces between the first model and each later one; descriptive, n = heads).
    - ``summary``: the comparison in words.
    """

    reads_weights = False  # the members' fisher.hotspots results only
    name = "fisher.hotspots_compare"
    min_models = 2  # a comparison: the core skips a smaller set with the fix
    version = "2"  # 2: the categories of fisher.hotspots 2
    summary = "FIM hotspots compared across models: joined table, global stats, category changes"
    Params = NoParams
    requires_metrics = ("fisher.hotspots",)
    derived_from = ("fisher.hotspots",)
    fields = {"table": "tall table of every model (run_name = model)",
              "global": "table: model and its global statistics",
              "category_changes": "table: layer, head, category per model, changed (same grids only)",
              "category_agreement": "share of heads with the same category in every model (same grids only)",
              "trace_rank_correlation": "Spearman rho of head traces, first model vs each later one (same grids only)",
              "summary": "the comparison in words (text)"}


    def compute_set(self, views: Mapping[str, ModelView],
                    results: Mapping[str, Mapping[str, MetricResult]]) -> dict[str, Any]:
        found = {m: r["fisher.hotspots"] for m, r in results.items() if r["fisher.hotspots"].ok}
        if len(found) < 2:
            failed = [m for m, r in results.items() if not r["fisher.hotspots"].ok]
            raise ValueError(f"fisher.hotspots ended ok on {len(found)} model(s) (not on {failed}); "
                             "a comparison needs two")
        names = list(found)
        table = [row for m in names for row in _table(found[m]).rows]
        out: dict[str, Any] = {
            "table": TableValue(columns=_table(found[names[0]]).columns, rows=table),
            "global": TableValue(columns=["run_name", *GLOBAL_STATS],
                                 rows=[[m, *(found[m].value(s) for s in GLOBAL_STATS)] for m in names]),
        }
        lines = [f"{len(names)} models: " + ", ".join(names) + "."]
        best = max(names, key=lambda m: found[m].value("compression_potential"))
        lines.append(f"highest compression potential: {best} ({found[best].value('compression_potential'):.1f}/100).")
        grids = {m: found[m].value("category") for m in names}
        if all(_shape(g) == _shape(grids[names[0]]) for g in grids.values()):
            rows, same = [], 0
            for layer, row in enumerate(grids[names[0]]):
                for head in range(len(row)):
                    cats = [CATEGORIES[int(grids[m][layer][head])] for m in names]
                    changed = len(set(cats)) > 1
                    same += not changed
                    rows.append([layer, head, *cats, changed])
            out["category_changes"] = TableValue(columns=["layer", "head", *names, "changed"], rows=rows)
            out["category_agreement"] = ScalarValue(value=same / len(rows), n=len(rows))
            traces = {m: [v for row in _trace_grid(found[m]) for v in row] for m in names}
            rhos = [correlation(traces[names[0]], traces[m], method="spearman", n_resamples=0).r for m in names[1:]]
            out["trace_rank_correlation"] = SeriesValue(values=rhos, index_name="model after the first")
            lines.append(f"{len(rows) - same} of {len(rows)} heads change category; Spearman rho of head traces "
                         f"against {names[0]}: " + ", ".join(f"{m} {r:.2f}" if r is not None else f"{m} n/a"
                                                             for m, r in zip(names[1:], rhos, strict=True)) + ".")
        else:
            lines.append("the models' layer x head grids differ: only their global statistics are compared.")
        out["summary"] = TextValue(text="\n".join(lines))
        return out


def _table(result: MetricResult) -> TableValue:
    table = result.values["table"]
    assert isinstance(table, TableValue)
    return table


def _shape(grid: list[list[Any]]) -> tuple[int, ...]:
    return (len(grid), *(len(r) for r in grid))


def _trace_grid(result: MetricResult) -> list[list[float]]:
    """Head traces rebuilt from the tall table (the hotspots result carries them there)."""
    cells: dict[tuple[int, int], float] = {}
    for _, layer, head, metric, value in _table(result).rows:
        if metric == "trace" and head != "mlp":
            cells[(layer, head)] = math.nan if value is None else value
    n_layers = 1 + max(layer for layer, _ in cells)
    return [[cells[(layer, h)] for h in sorted(h for l2, h in cells if l2 == layer)] for layer in range(n_layers)]
