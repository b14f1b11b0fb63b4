"""Reports: the JSON record with comparisons and findings, HTML (jinja2) and PDF (weasyprint)
with matplotlib plots inline as SVG.

Needs the ``report`` extra (``pip install 'tensorscope[report]'``); nothing here is
imported by ``analyze``. Plugins add sections with the ``register_report_sections``
hook and draw with ``tensorscope_core.report.plots``.
"""

from __future__ import annotations

from .build import REPORT_JSON, report_record, save_report

__all__ = ["REPORT_JSON", "report_record", "save_report"]
