"""What every section needs to know about a run, computed once: the models in comparison
order, their display names and steps, the change intervals compare() found, the metric
descriptions, and the list of what was left out of the pages (shown in the appendix)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..results.analysis import Interpretation
from .selection import step_axis

if TYPE_CHECKING:
    from ..results import Results
    from ..results.analysis import ModelOrder


@dataclass
class Context:
    results: Results
    ordering: ModelOrder
    label: Mapping[str, str]
    describe: Mapping[str, dict[str, Any]]
    interpretations: list[tuple[str, str, Interpretation]]
    #: (metric, field or "field[layer]") -> [(model before, model after)] of the changes compare() found
    spans: dict[tuple[str, str], list[tuple[str, str]]] = field(default_factory=dict)
    #: family -> reason -> fields not drawn (constant, bookkeeping, over the figure limit, ...)
    left_out: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    @property
    def order(self) -> list[str]:
        return list(self.ordering.names)

    @property
    def series(self) -> bool:
        return self.ordering.is_series and len(self.ordering.names) > 1

    @property
    def axis(self) -> tuple[list[float], str]:
        return step_axis(self.ordering.steps)

    def x_of(self, model: str) -> float:
        return self.axis[0][self.order.index(model)]

    def shaded(self, metric: str, name: str) -> list[tuple[float, float]]:
        """The x intervals of the changes found in ``metric.name``."""
        return [(self.x_of(a), self.x_of(b)) for a, b in self.spans.get((metric, name), [])
                if a in self.order and b in self.order]

    def leave_out(self, family: str, reason: str, names: list[str]) -> None:
        if names:
            self.left_out.setdefault(family, {}).setdefault(reason, []).extend(names)


def change_spans(results: Results) -> dict[tuple[str, str], list[tuple[str, str]]]:
    out: dict[tuple[str, str], list[tuple[str, str]]] = {}
    c = results.comparisons
    if c is None:
        return out
    for s in c.scalars:
        for ch in s.changes:
            out.setdefault((s.metric, s.field), []).append((ch.model_before, ch.model_after))
    for lt in c.layers:
        for ch in lt.changes:
            out.setdefault((lt.metric, f"{lt.field}[{ch.label}]"), []).append((ch.model_before, ch.model_after))
    return out
