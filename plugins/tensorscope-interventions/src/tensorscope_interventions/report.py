"""Report section: the loss along the intervention path and the recovery of each block transplant."""

from __future__ import annotations

from typing import Any

from tensorscope_core.plugin_api import report_plots

TITLE = "Interventions"
METRIC = "interventions.vectors"


def _path_plot(result: Any) -> str:
    plots = report_plots()
    fig = plots.new_figure(height=2.6)
    ax = fig.add_subplot()
    alphas, losses = result.value("alphas"), result.value("loss_path")
    ax.plot(alphas, [float("nan") if x is None else x for x in losses], marker="o", ms=3)
    for alpha in (0.0, 1.0):  # the broken and the healthy model
        ax.axvline(alpha, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("alpha (0: broken, 1: healthy)")
    ax.set_ylabel("loss (nats)")
    return plots.figure_html(plots.render(fig, f"Loss along theta_b + alpha v ({result.values['pair'].text})"))


def _recovery_plot(result: Any) -> str:
    plots = report_plots()
    recovery = result.values["recovery"]
    fig = plots.new_figure(height=2.6)
    ax = fig.add_subplot()
    ax.bar([str(k) for k in recovery.keys()], [0.0 if v is None else v for v in recovery.values])
    ax.axhline(1.0, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("block transplanted from the healthy model")
    ax.set_ylabel("recovery")
    return plots.figure_html(plots.render(fig, "Layer-wise recovery by block transplant (1: the whole gap)"))


def interventions_section(results: Any) -> str | None:
    """The path and the recovery bars of ``interventions.vectors``; nothing when it did not run ok."""
    from markupsafe import escape

    result = results.record.model_set.get(METRIC)
    if result is None or not result.ok:
        return None
    parts = [f"<h3>{escape(METRIC)}: {escape(result.values['pair'].text)}</h3>", _path_plot(result)]
    if "recovery" in result.values:
        parts.append(_recovery_plot(result))
    else:
        parts.append(f"<p>{escape(result.values['recovery_note'].text)}</p>")
    return "".join(parts)
