"""The report's data: comparisons and correlation findings (computed with defaults where the
user has not run them), added to the run record; and the JSON + CSV it is saved as."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..results.analysis import ReportRecord, Unit
from ..results.store import atomic_write, save_tensors
from ..stats import InsufficientSampleWarning

if TYPE_CHECKING:
    from ..results import Results

REPORT_JSON = "analysis.json"


def ensure_analyses(results: Results, *, units: Sequence[Unit] | None = None, method: str = "spearman",
                    min_n: int = 30, fdr: float = 0.05, order: Sequence[str] | None = None,
                    outcome: Mapping[str, float] | None = None) -> None:
    """Run ``compare`` (two or more models) and ``discover_correlations`` for ``units``
    (default: every unit with at least two variables), unless the user already did: their
    settings win. Floor warnings are collected into the report instead of being emitted."""
    from ..checkpoints import order_models
    from ..discovery import UNITS, collect
    from .analyses import compare, discover_correlations

    record = results.record
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsufficientSampleWarning)
        if results.comparisons is None and len(record.models) >= 2:
            compare(results, order=order, outcome=outcome, alpha=fdr, min_n=min_n)
        ordering = results.comparisons.order if results.comparisons is not None else order_models(results.models)
        explicit = ordering.names if ordering.ordered_by == "explicit" else None
        for unit in units or UNITS:
            if unit in results.correlations or not record.models:
                continue
            if units is None and unit == "checkpoint" and (not ordering.is_series or len(ordering.names) < 3):
                continue
            if units is None and unit == "model" and len(record.models) < 3:
                continue
            if units is not None or len(collect(record, unit, ordering)) >= 2:
                discover_correlations(results, unit=unit, method=method, min_n=min_n, fdr=fdr, order=explicit)


def report_record(results: Results) -> ReportRecord:
    ensure_analyses(results)
    return ReportRecord.model_validate({**results.record.model_dump(), "comparisons": results.comparisons,
                                        "correlations": list(results.correlations.values())})


def save_report(results: Results, path: Path) -> Path:
    """Write the report JSON (``path``, or ``path/analysis.json`` for a folder), with
    results.csv and any tensors beside it, so ``Results.load(path)`` reads it back."""
    from ..results import RESULTS_CSV, TENSORS_FILE

    if path.is_dir() or not path.suffix:
        path = path / REPORT_JSON
    record = report_record(results)
    if results.tensors:
        save_tensors(results.tensors, path.parent / TENSORS_FILE)
    with atomic_write(path.parent / RESULTS_CSV) as handle:
        handle.write(results.to_csv())
    with atomic_write(path) as handle:
        handle.write(record.model_dump_json(indent=2))
    return path
