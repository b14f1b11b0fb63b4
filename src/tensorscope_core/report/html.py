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


def plugin_sections(results: Results, registry: Registry) -> list[Section]:
    """Sections plugins contribute through ``register_report_sections``; ``render(results)``
    returns HTML, or None / '' to stay out of this report."""
    sections = []
    for i, (title, render) in enumerate(registry.report_sections):
        section = Section(f"contributed-{i}", title)
        try:
            html = render(results)
        except Exception as exc:
            section.blocks.append(Para(f"this section failed: {type(exc).__name__}: {exc}", "error"))
        else:
            if not html:
                continue
            section.blocks.append(Html(str(html)))
        sections.append(section)
    return sections


def build_sections(results: Results, *, progress: bool = False) -> list[Section]:
    """Overview, comparisons, correlations, one section per plugin's metrics, contributed sections."""
    from ..checkpoints import order_models
    from ..plugins import get_registry
    from .comparison_section import comparison_section
    from .correlation_section import correlation_section
    from .metric_sections import metric_sections
    from .overview import overview

    registry = get_registry()
    ensure_analyses(results)
    ordering = results.comparisons.order if results.comparisons is not None else order_models(results.models)
    order = ordering.names
    readings = interpretations(results, order, registry)
    label = short_names(order)
    describe = {name: cls.describe() for name, cls in registry.metrics.items()}
    steps: list[tuple[str, Callable[[], list[Section]]]] = [
        ("overview", lambda: [overview(results, order, list(ordering.steps), readings, label)]),
        ("comparisons", lambda: [comparison_section(results.comparisons, label)] if results.comparisons else []),
        ("correlations", lambda: [correlation_section(results.record, list(results.correlations.values()),
                                                      ordering, label)]),
        ("metrics", lambda: metric_sections(results, order, ordering.is_series, describe, readings, label)),
        ("plugin sections", lambda: plugin_sections(results, registry)),
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
