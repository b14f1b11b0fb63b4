"""The report section of fisher.hotspots: per model a layer x head map of the categories, a cond-vs-trace
scatter of the heads and the summary text; then the interpretation guide once."""

from __future__ import annotations

from typing import Any

from .hotspots_rules import CATEGORIES

TITLE = "Fisher hotspots"
COLOURS = {"critical": "#e53935", "moderate": "#fbc02d", "high_potential": "#43a047"}


def _head_points(result: Any) -> tuple[list[Any], list[Any], list[float], list[Any]]:
    """trace, cond, layer and effective rank of every head, from the tall table."""
    cells: dict[tuple[int, int], dict[str, Any]] = {}
    for _, layer, head, metric, value in result.values["table"].rows:
        if head != "mlp":
            cells.setdefault((layer, head), {})[metric] = value
    keys = sorted(cells)
    return ([cells[k]["trace"] for k in keys], [cells[k]["cond"] for k in keys], [float(k[0]) for k in keys],
            [cells[k]["effective_rank"] for k in keys])


def hotspots_section(results: Any) -> str | None:
    """Every model with an ok fisher.hotspots result; nothing when none has one."""
    from markupsafe import escape

    from tensorscope_core.plugin_api import report_plots

    plots = report_plots()

    shown = [m for m in results.models if "fisher.hotspots" in results.model(m).metrics
             and results.get("fisher.hotspots", model=m).ok]
    if not shown:
        return None
    parts = []
    for model in shown:
        result = results.get("fisher.hotspots", model=model)
        grid = [[CATEGORIES[int(c)] for c in row] for row in result.value("category")]
        heat = plots.category_grid(grid, COLOURS, f"{model}: Fisher category of each head")
        trace, cond, layer, rank = _head_points(result)
        scatter = plots.bubble_scatter(trace, cond, layer, rank, f"{model}: condition number against trace per "
                                       "head (colour: layer, size: effective rank)", xlabel="trace (log scale)",
                                       ylabel="cond (log scale)", colour_label="layer", logx=True, logy=True)
        parts.append(f"<h3>{escape(model)}</h3>" + plots.figure_html(heat) + plots.figure_html(scatter)
                     + f"<pre>{escape(result.values['summary'].text)}</pre>")
    guide = results.get("fisher.hotspots", model=shown[0]).values.get("guide")  # absent before version 2
    if guide is not None:
        parts.append(f"<pre>{escape(guide.text)}</pre>")
    return "".join(parts)
