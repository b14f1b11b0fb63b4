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


class ModelLoadError(TensorScopeError):
    pass


class UnsupportedModelError(ModelLoadError):
    pass


class NonFiniteWeightsError(ModelLoadError):
    pass


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
