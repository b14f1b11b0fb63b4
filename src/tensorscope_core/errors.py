"""Typed errors: each names the problem and the fix, so a user never reads a bare traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TensorScopeError(Exception):
    """Base of every error TensorScope raises on purpose.

    ``fix`` says what the user can do about it; the CLI prints both and maps
    ``exit_code`` to the process exit status.
    """

    exit_code = 1

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}\n  fix: {fix}" if fix else problem)


class UsageError(TensorScopeError):
    """The request itself is wrong (unknown name, bad parameter): CLI exit code 2."""

    exit_code = 2


class UnknownMetricError(UsageError):
    pass


class BadParameterError(UsageError):
    pass


class MetricCycleError(UsageError):
    pass


class PlanDoesNotFitError(TensorScopeError):
    """The declared peak memory exceeds the budget even at the smallest micro-batch."""

    exit_code = 3

    def __init__(self, problem: str, fix: str, plan_text: str) -> None:
        self.plan_text = plan_text
        super().__init__(f"{problem}\n{plan_text}", fix)


class NotApplicable(TensorScopeError):
    """Raised by a metric that finds while it runs that it does not apply to this run (e.g. the data
    has no task of the name it compares): the metric ends ``skipped`` with ``problem`` and ``fix``
    as the reason, not ``error``. What can be known before running belongs in ``skip_reason``."""


class ModelLoadError(TensorScopeError):
    pass


class UnsupportedModelError(ModelLoadError):
    pass


class NonFiniteWeightsError(ModelLoadError):
    pass


class ModelChangedError(ModelLoadError):
    """A model's files changed between planning and running it: the plan no longer describes it."""


class DataError(TensorScopeError):
    pass


class EmptyDataError(DataError):
    pass


class TokenizerMismatchError(DataError):
    pass


class SequenceTooLongError(DataError):
    pass


class PluginError(TensorScopeError):
    pass


class MetricTimeoutError(TensorScopeError):
    pass


class ResultsFormatError(TensorScopeError):
    pass


class OutputError(TensorScopeError):
    """An output file could not be written (disk full, permissions); nothing half-written is left."""


REPORT_EXTRA = "pip install 'tensorscope[report]'"
#: Debian/Ubuntu packages weasyprint loads at import (pango and its text shaping).
PDF_SYSTEM_PACKAGES = "apt-get install libpango-1.0-0 libpangoft2-1.0-0 libharfbuzz0b libharfbuzz-subset0"


class MissingDependencyError(TensorScopeError):
    """An optional dependency (the ``report`` extra) is not installed; analysis still works without it."""

    def __init__(self, package: str, needed_for: str, fix: str = REPORT_EXTRA) -> None:
        self.package = package
        super().__init__(f"{needed_for} needs {package}, which is not installed", fix)


class PdfUnavailableError(MissingDependencyError):
    """weasyprint or the system libraries it loads (pango) are missing: no PDF, the HTML is still written."""

    def __init__(self, detail: str, html_path: str | None = None) -> None:
        self.detail = detail
        self.html_path = html_path
        fix = f"{REPORT_EXTRA}, and on Debian/Ubuntu `{PDF_SYSTEM_PACKAGES}`"
        if html_path:
            fix += f"; the HTML report was written to {html_path}"
        super().__init__("weasyprint (with pango)", f"the PDF report ({detail})", fix)


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Names among ``candidates`` that look like ``name`` (for "did you mean" hints)."""
    pool = sorted(set(candidates))
    found = difflib.get_close_matches(name, pool, n=n, cutoff=0.5)
    if not found:
        # A bare family-less name ("loss") should still find "basic.loss".
        found = [c for c in pool if c.split(".")[-1] == name.split(".")[-1]][:n]
    return found


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    found = close_matches(name, candidates)
    return f"did you mean {', '.join(repr(f) for f in found)}?" if found else ""
