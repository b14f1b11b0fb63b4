"""Assemble the report's sections and render them with jinja2 (autoescaping every value)."""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MissingDependencyError
from ..results.analysis import Interpretation
from ..results.store import atomic_write
from .blocks import Html, Para, Section, short_names
from .build import ensure_analyses

if TYPE_CHECKING:
    from ..plugins import Registry
    from ..results import Results

TEMPLATE = "report.html.j2"


def _soft(value: Any) -> Any:
    """Escaped text with break opportunities after / . _ - in long names, so narrow table
    columns wrap at word parts, never inside a number."""
    from markupsafe import Markup, escape

    text = str(escape(value))
    return Markup(re.sub(r"([/._-])", r"\1<wbr>", text) if len(text) > 12 else text)


def _environment() -> Any:
    try:
        import jinja2
    except ImportError as exc:
        raise MissingDependencyError("jinja2", "the HTML report") from exc
    # autoescape=True for every template: the file suffix is .j2, which select_autoescape would miss
    env = jinja2.Environment(loader=jinja2.PackageLoader("tensorscope_core.report", "templates"),
                             autoescape=True, trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["soft"] = _soft
    return env


def interpretations(results: Results, order: list[str], registry: Registry) -> list[tuple[str, str, Interpretation]]:
    """(model, metric, reading) for every ok result whose metric defines ``interpret``."""
    out = []
    by_name = {m.name: m for m in results.record.models}
    for name in order:
        for metric, result in by_name[name].metrics.items():
            cls = registry.metrics.get(metric)
            if cls is None or not result.ok:
                continue
            try:
                out += [(name, metric, i) for i in cls.interpret(result)]
            except Exception as exc:  # a faulty interpretation must not cost the report
                out.append((name, metric, Interpretation(level="warning",
                                                         text=f"interpretation failed: {type(exc).__name__}: {exc}")))
    return out


#: figures a plugin-contributed section shows (the last ones: per-model sections end on the latest model)
CONTRIBUTED_FIGURES = 3
#: rows of each table in a plugin-contributed section (the first ones)
CONTRIBUTED_ROWS = 12


def trim_tables(html: str, rows: int = CONTRIBUTED_ROWS) -> str:
    """Each ``<table>`` of ``html`` cut to its header and first ``rows`` rows, with a note of the rest."""
    def cut(match: re.Match[str]) -> str:
        table = match.group(0)
        found = list(re.finditer(r"<tr\b.*?</tr>", table, re.S))
        body = [m for m in found if "<td" in m.group(0)]
        if len(body) <= rows:
            return table
        end = body[rows - 1].end()
        return (table[:end] + "</table>" + f'<p class="muted">first {rows} of {len(body)} rows; all in '
                f"results.json</p>")

    return re.sub(r"<table\b.*?</table>", cut, html, flags=re.S)


def plugin_sections(results: Results, registry: Registry) -> list[Section]:
    """Sections plugins contribute through ``register_report_sections``; ``render(results)``
    returns HTML, or None / '' to stay out of this report. Each shows at most
    ``CONTRIBUTED_FIGURES`` figures, with a note of how many it left out."""
    from .plots import figure_budget

    sections = []
    for i, (title, render) in enumerate(registry.report_sections):
        section = Section(f"contributed-{i}", title, flow=True)
        try:
            with figure_budget(CONTRIBUTED_FIGURES) as budget:
                html = render(results)
            html = trim_tables(budget.resolve(str(html))) if html else html
        except Exception as exc:
            section.blocks.append(Para(f"this section failed: {type(exc).__name__}: {exc}", "error"))
        else:
            if not html:
                continue
            section.blocks.append(Html(str(html)))
            if budget.dropped:
                section.blocks.append(Para(f"{budget.dropped} earlier figure(s) of this section not shown (the same "
                                           f"plots for other models); the values are in results.json.", "muted"))
        sections.append(section)
    return sections


def build_sections(results: Results, *, progress: bool = False) -> list[Section]:
    """Summary (the executive page), comparisons, correlations, one section per metric family,
    the plugins' contributed sections, the appendix."""
    from ..checkpoints import order_models
    from ..plugins import get_registry
    from .appendix import appendix
    from .comparison_section import comparison_section
    from .context import Context, change_spans
    from .correlation_section import correlation_section
    from .metric_sections import metric_sections
    from .summary import summary

    registry = get_registry()
    ensure_analyses(results)
    ordering = results.comparisons.order if results.comparisons is not None else order_models(results.models)
    ctx = Context(results, ordering, short_names(ordering.names),
                  {name: cls.describe() for name, cls in registry.metrics.items()},
                  interpretations(results, list(ordering.names), registry), change_spans(results))
    steps: list[tuple[str, Callable[[], list[Section]]]] = [
        ("summary", lambda: [summary(ctx)]),
        ("comparisons", lambda: [comparison_section(results.comparisons, ctx.label)] if results.comparisons else []),
        ("correlations", lambda: [correlation_section(results.record, list(results.correlations.values()),
                                                      ordering, ctx.label)]),
        ("families", lambda: metric_sections(ctx)),
        ("plugin sections", lambda: plugin_sections(results, registry)),
        ("appendix", lambda: [appendix(ctx)]),
    ]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(steps), desc="report", unit="section")
    sections: list[Section] = []
    try:
        for what, build in steps:
            if bar is not None:
                bar.set_postfix_str(what)
            sections += build()
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return sections


def render_html(results: Results, *, progress: bool = False) -> str:
    sections = build_sections(results, progress=progress)
    models = results.models
    title = "TensorScope report: " + (models[0] if len(models) == 1 else f"{len(models)} models")
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return str(_environment().get_template(TEMPLATE).render(title=title, sections=sections, generated=generated))


def write_html(results: Results, path: Path, *, progress: bool = False) -> Path:
    html = render_html(results, progress=progress)
    with atomic_write(path) as handle:
        handle.write(html)
    return path
