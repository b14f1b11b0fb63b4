"""Comparisons and correlation discovery over a run's ``Results``, kept on it for reports.

``Results`` is plain data (the record and its tensors); these functions compute the analyses
from it and store the latest ones on ``results.comparisons`` / ``results.correlations``, which
the report JSON, HTML and PDF then reuse (the user's settings win over the reports' defaults).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..results import Results
    from ..results.analysis import Comparisons, Discovery, Unit


def compare(results: Results, *, order: Sequence[str] | None = None, outcome: Mapping[str, float] | None = None,
            early: str | None = None, alpha: float = 0.05, min_n: int = 30, trend_min_n: int = 5,
            seed: int | None = None) -> Comparisons:
    """Per metric across models: values, highest/lowest, differences with significance where
    per-example values exist, trends over checkpoints (ordered by the step in their names,
    or ``order``), and early indicators of the final values or of ``outcome`` per model."""
    from ..compare import compare as compare_record

    results.comparisons = compare_record(results.record, order=order, outcome=outcome, early=early, alpha=alpha,
                                         min_n=min_n, trend_min_n=trend_min_n, seed=seed)
    return results.comparisons


def discover_correlations(results: Results, metrics: Sequence[str] | None = None, unit: Unit = "layer",
                          method: str = "spearman", min_n: int = 30, fdr: float = 0.05, **kwargs: Any) -> Discovery:
    """Every pair of metric values sharing ``unit`` (layer, head, model, checkpoint), FDR-corrected,
    with r, CI and n; below ``min_n`` pairs nothing is claimed. Never pairs a metric with itself
    or with a recorded derivation, nor per-layer values on different axes. Keywords: ``order``,
    ``derived``, ``seed``, ``n_resamples``."""
    from ..discovery import discover_correlations as discover

    found = discover(results.record, metrics, unit, method, min_n, fdr, **kwargs)  # type: ignore[arg-type]
    results.correlations[unit] = found
    return found
