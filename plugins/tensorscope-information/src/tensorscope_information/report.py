"""The report section: MI per layer with CI bands, the PID atoms with their CIs, MDL compression per layer."""

from __future__ import annotations

from typing import Any

TITLE = "Information"
MI, PID, MDL = "information.mutual_information", "information.pid", "information.mdl"
ATOMS = ("redundancy", "unique_1", "unique_2", "synergy")


def _ok(results: Any, metric: str) -> list[str]:
    return [m for m in results.models if metric in results.model(m).metrics and results.get(metric, model=m).ok]


def _bands(plots: Any, result: Any, fields: list[tuple[str, str]], caption: str, xlabel: str) -> Any:
    """Lines of per-layer estimates, each with its CI as a shaded band."""
    fig = plots.new_figure(height=2.8)
    ax = fig.add_subplot()
    for field, label in fields:
        if field not in result.values:
            continue
        values = [float("nan") if v is None else v for v in result.value(field)]
        low = [float("nan") if v is None else v for v in result.value(f"{field}_ci_low")]
        high = [float("nan") if v is None else v for v in result.value(f"{field}_ci_high")]
        xs = list(range(len(values)))
        ax.plot(xs, values, marker="o", ms=3, label=label)
        ax.fill_between(xs, low, high, alpha=0.25)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("nats")
    ax.legend(fontsize=7, frameon=False)
    return plots.render(fig, caption)


def _pid_bars(plots: Any, result: Any, caption: str) -> Any:
    fig = plots.new_figure(height=2.4)
    ax = fig.add_subplot()
    values = [result.values[a].value for a in ATOMS]
    errors = [
        [
            v - (result.values[a].ci_low if result.values[a].ci_low is not None else v)
            for a, v in zip(ATOMS, values, strict=True)
        ],
        [
            (result.values[a].ci_high if result.values[a].ci_high is not None else v) - v
            for a, v in zip(ATOMS, values, strict=True)
        ],
    ]
    ax.bar(range(len(ATOMS)), values, yerr=[[max(0.0, e) for e in row] for row in errors], capsize=3)
    ax.set_xticks(range(len(ATOMS)), [a.replace("_", " ") for a in ATOMS])
    ax.set_ylabel("bits")
    return plots.render(fig, caption)


def information_section(results: Any) -> str | None:
    """Per model: MI per layer with CI bands, the PID atoms, MDL compression per layer; None when none ran."""
    from markupsafe import escape

    from tensorscope_core.plugin_api import report_plots

    plots = report_plots()
    shown = {metric: _ok(results, metric) for metric in (MI, PID, MDL)}
    if not any(shown.values()):
        return None
    parts = []
    for model in results.models:
        figures = []
        if model in shown[MI]:
            result = results.get(MI, model=model)
            figures.append(
                _bands(
                    plots,
                    result,
                    [("probe_next_token", "probe: next token"), ("probe_task", "probe: task")],
                    f"{model}: I(h_l; Y) probe lower bound per resid entry (95% CI band)",
                    "resid entry",
                )
            )
            figures.append(
                _bands(
                    plots,
                    result,
                    [("gaussian", "Gaussian (CCA)"), ("ksg", "KSG")],
                    f"{model}: MI between resid l and l + 1 per block (95% CI band)",
                    "block",
                )
            )
        if model in shown[PID]:
            result = results.get(PID, model=model)
            figures.append(_pid_bars(plots, result, f"{model}: PID atoms (95% CI); {result.values['estimator'].text}"))
        if model in shown[MDL]:
            result = results.get(MDL, model=model)
            compression = result.value("compression")
            figures.append(
                plots.layer_lines(
                    [str(i) for i in range(len(compression))],
                    {model: compression},
                    f"{model}: MDL compression (uniform / online code) per resid entry",
                    ylabel="compression",
                )
            )
        if figures:
            parts.append(f"<h3>{escape(model)}</h3>" + "".join(plots.figure_html(f) for f in figures))
    return "".join(parts)
