"""The HTML report printed to PDF with weasyprint.

weasyprint loads pango through cffi at import; a missing wheel or missing system
library is turned into PdfUnavailableError after the HTML is written beside the PDF
path, so a machine without them still gets the report.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import PdfUnavailableError
from ..results.store import atomic_write
from .html import render_html

if TYPE_CHECKING:
    from ..results import Results


def weasyprint_html() -> Any:
    """weasyprint's HTML class, or PdfUnavailableError saying what is missing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "HarfBuzz-Subset will be required ..."
            from weasyprint import HTML
    except ImportError as exc:
        raise PdfUnavailableError(f"weasyprint is not installed: {exc}") from exc
    except OSError as exc:  # cffi could not load pango / gobject / harfbuzz
        raise PdfUnavailableError(f"weasyprint cannot load its system libraries: {exc}") from exc
    return HTML


def html_to_pdf(html: str, path: Path) -> Path:
    document = weasyprint_html()(string=html).write_pdf()
    with atomic_write(path, "wb") as handle:
        handle.write(document)
    return path


def write_pdf(results: Results, path: Path, *, progress: bool = False, html_path: Path | None = None) -> Path:
    """The PDF, and the same render as HTML at ``html_path`` when given (one render for both)."""
    html = render_html(results, progress=progress)
    if html_path is not None:
        with atomic_write(html_path) as handle:
            handle.write(html)
    try:
        return html_to_pdf(html, path)
    except PdfUnavailableError as exc:
        fallback = path.with_suffix(".html")
        with atomic_write(fallback) as handle:
            handle.write(html)
        raise PdfUnavailableError(exc.detail, str(fallback)) from exc
