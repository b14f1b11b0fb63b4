"""The report section: per model, the MLP graphs' Q against their null per block, and the tasks'
separability per resid entry."""

from __future__ import annotations

from typing import Any

TITLE = "Structure: modularity and separability"
MODULARITY = "structure.modularity"
SEPARABILITY = "structure.separability"


def _ok(results: Any, model: str, metric: str) -> Any:
    return (
        results.get(metric, model=model)
        if metric in results.model(model).metrics and results.get(metric, model=model).ok
        else None
    )


def _modularity(plots: Any, model: str, result: Any) -> str:
    from markupsafe import escape

    q, mean, sd = (result.value(f"mlp_{f}") for f in ("q", "null_mean", "null_std"))
    band = [None if m is None or s is None else m + 2 * s for m, s in zip(mean, sd, strict=True)]
    plot = plots.layer_lines(
        [str(i) for i in range(len(q))],
        {"Q": q, "null mean": mean, "null mean + 2 SD": band},
        f"{model}: modularity Q of each MLP unit graph against its weight-shuffled null",
        ylabel="Q",
    )
    heads = f"head graph: {result.values['head_graph'].text}"
    if "head_q" in result.values:
        heads += (
            f"; Q {result.value('head_q'):.3f}, null {result.value('head_null_mean'):.3f}, "
            f"p = {result.value('head_p_value'):.3g}"
        )
    return plots.figure_html(plot) + f"<p>{escape(heads)}</p>"


def _separability(plots: Any, model: str, result: Any) -> str:
    accuracy = result.value("probe_accuracy")
    labels = [str(i) for i in range(len(accuracy))]
    chance = [result.value("chance")] * len(accuracy)
    probe = plots.layer_lines(
        labels,
        {"probe accuracy": accuracy, "chance": chance},
        f"{model}: cross-validated balanced accuracy of the task probe per resid entry",
        ylabel="balanced accuracy",
    )
    mmd = plots.layer_lines(
        labels,
        {"MMD^2": result.value("mmd2")},
        f"{model}: unbiased MMD^2 between the tasks per resid entry (tasks: {result.values['tasks'].text})",
        ylabel="MMD^2",
    )
    return plots.figure_html(probe) + plots.figure_html(mmd)


def structure_section(results: Any) -> str | None:
    """Every model with an ok structure.modularity or structure.separability; nothing when none has one."""
    from markupsafe import escape

    from tensorscope_core.plugin_api import report_plots

    plots = report_plots()
    parts = []
    for model in results.models:
        modularity, separability = _ok(results, model, MODULARITY), _ok(results, model, SEPARABILITY)
        if modularity is None and separability is None:
            continue
        html = f"<h3>{escape(model)}</h3>"
        if modularity is not None:
            html += _modularity(plots, model, modularity)
        if separability is not None:
            html += _separability(plots, model, separability)
        parts.append(html)
    return "".join(parts) or None
