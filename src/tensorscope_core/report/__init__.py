"""Reports: comparisons and correlation findings over a run's ``Results``, the JSON record with
them, HTML (jinja2) and PDF (weasyprint) with matplotlib plots inline (SVG, PNG where dense).

``Results`` is plain data; everything that analyses or renders it lives here:

    from tensorscope_core.report import compare, discover_correlations, generate_html_report
    compare(res); discover_correlations(res, unit="layer"); generate_html_report(res, "report.html")

Effect sizes, HTML and PDF need the ``report`` extra (``pip install 'tensorscope[report]'``);
nothing here is imported by ``analyze``. Plugins add sections with the
``register_report_sections`` hook and draw with ``plugin_api.report_plots()``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .analyses import compare, discover_correlations
from .build import REPORT_JSON, report_record
from .build import save_report as _save_report

if TYPE_CHECKING:
    from ..results import Results


def save_report(results: Results, path: str | Path) -> Path:
    """Write the report JSON to ``path`` (a folder gets analysis.json) and results.csv beside it;
    comparisons and findings are computed with defaults where not computed yet."""
    return _save_report(results, Path(path))


def generate_html_report(results: Results, path: str | Path, *, progress: bool = False) -> Path:
    """A self-contained HTML report (plots inline as SVG)."""
    from .html import write_html

    return write_html(results, Path(path), progress=progress)


def generate_pdf_report(results: Results, path: str | Path, *, progress: bool = False,
                        html: str | Path | None = None) -> Path:
    """The HTML report as PDF (weasyprint); ``html``: also write the HTML there, from the same
    render (half the time of two calls). Without weasyprint or pango, raises
    PdfUnavailableError after writing the HTML beside ``path``."""
    from .pdf import write_pdf

    return write_pdf(results, Path(path), progress=progress, html_path=Path(html) if html is not None else None)


__all__ = ["REPORT_JSON", "compare", "discover_correlations", "generate_html_report", "generate_pdf_report",
           "report_record", "save_report"]
