"""The report section: checkpoint trajectories with the detected changes marked as intervals,
and the grokking curves. Reads the saved results only (it may run in another process)."""

from __future__ import annotations

import re
from typing import Any

PANELS = 9
_LAYER = re.compile(r"^(.*)\[(.+)\]$")


def _value(results: Any, model: str, series: str) -> float | None:
    """One member's value of a series key ``family.metric.field`` or ``family.metric.field[layer]``."""
    from tensorscope_core.plugin_api import LayerValue, ScalarValue

    layer = _LAYER.match(series)
    base, key = (layer.group(1), layer.group(2)) if layer else (series, None)
    family, metric, field = base.split(".", 2)
    try:
        result = results.get(f"{family}.{metric}", model=model)
    except KeyError:
        return None
    value = result.values.get(field) if result.ok else None
    if isinstance(value, ScalarValue) and key is None:
        return value.value
    if isinstance(value, LayerValue) and key is not None:
        return dict(zip(value.keys(), value.values, strict=True)).get(key)
    return None


def _changes_plot(results: Any, phase: Any) -> str:
    from tensorscope_core.plugin_api import report_plots

    plots = report_plots()
    order = phase.value("checkpoints")
    names, steps = [r[0] for r in order.rows], [r[1] for r in order.rows]
    table = phase.value("changes")
    col = {c: i for i, c in enumerate(table.columns)}
    marked = list(dict.fromkeys(r[col["series"]] for r in table.rows))
    shown = sorted(marked, key=lambda s: (not s.startswith("basic.loss."), s))[:PANELS]
    if not shown:
        return ""
    cols = min(3, len(shown))
    fig = plots.new_figure(height=2.1 * (-(-len(shown) // cols)) + 0.3)
    axes = fig.subplots(-(-len(shown) // cols), cols, squeeze=False)
    for ax, series in zip(axes.flat, shown, strict=False):
        ax.plot(steps, [_value(results, n, series) for n in names], marker="o", ms=3, color="#1f77b4")
        for row in table.rows:
            if row[col["series"]] == series:
                ax.axvspan(row[col["step_before"]], row[col["step_after"]], color="#d62728", alpha=0.15, lw=0)
                ax.axvline(row[col["step_at"]], color="#d62728", lw=0.8, ls="--")
        ax.set_title(series if len(series) <= 40 else series[:39] + "…")
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(shown) :]:
        ax.set_visible(False)
    return plots.figure_html(
        plots.render(
            fig,
            "Trajectories across checkpoints; shaded: the step interval in "
            "which PELT places each change (dashed: its midpoint)",
        )
    )


def _changes_table(phase: Any) -> str:
    from markupsafe import escape

    table = phase.value("changes")
    head = "".join(f"<th>{escape(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(f"<td>{escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in table.rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _grokking_plot(grok: Any) -> str:
    from tensorscope_core.plugin_api import report_plots

    plots = report_plots()
    curves = grok.value("curves")
    steps = [r[1] for r in curves.rows]
    fig = plots.new_figure(height=2.6)
    ax = fig.add_subplot()
    ax.plot(steps, [r[2] for r in curves.rows], marker="o", ms=3, label="train")
    ax.plot(steps, [r[3] for r in curves.rows], marker="o", ms=3, label="held-out")
    for field, colour in (("t_train", "#1f77b4"), ("t_test", "#ff7f0e")):
        onset = grok.value(field)
        if onset is not None:
            ax.axvline(onset, color=colour, ls="--", lw=0.8)
    if min(steps) > 0:
        ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.legend()
    return plots.figure_html(plots.render(fig, "Grokking: train and held-out curves (dashed: onset at theta)"))


def dynamics_section(results: Any) -> str | None:
    """Phase transitions (trajectories with the change intervals marked, and the table) and
    grokking curves; nothing when neither model-set metric ran ok."""
    parts = []
    phase = results.record.model_set.get("dynamics.phase_transitions")
    if phase is not None and phase.ok:
        if phase.value("n_changes"):
            parts += ["<h3>Phase transitions</h3>", _changes_plot(results, phase), _changes_table(phase)]
        else:
            parts += ["<h3>Phase transitions</h3>", "<p>No change point found in the series searched.</p>"]
    grok = results.record.model_set.get("dynamics.grokking")
    if grok is not None and grok.ok:
        parts += ["<h3>Grokking</h3>", _grokking_plot(grok)]
    return "".join(parts) or None
