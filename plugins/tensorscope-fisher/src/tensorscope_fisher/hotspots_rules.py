"""The FIM hotspot rules: a category and two 0-100 scores per attention head, from its Fisher spectrum.

Ratios are against the run's own heads (the median over all heads of the model), so the rules
read the same on models of any size and loss scale:

- ``trace_ratio = trace / median(trace)``, ``eigmax_ratio = eigmax / median(eigmax)`` (a ratio
  against a zero median is ``inf`` for a positive value and 0 for a zero one).
- ``critical`` (protect: large Fisher mass, or one very sharp direction) when
  ``trace_ratio ≥ critical_trace_ratio`` or ``eigmax_ratio ≥ critical_eigmax_ratio``;
- else ``high_potential`` (compression target: little Fisher mass, concentrated in a few
  directions, so a low-rank or pruned head keeps most of it) when
  ``trace_ratio ≤ potential_trace_ratio`` and ``energy_r8 ≥ potential_energy_r8``;
- else ``moderate``. Boundaries are inclusive; a head with a zero Fisher (no effect on the
  loss) has ``energy_r8`` taken as 1.

Scores per head, on 0-100:

- ``compression_potential = 100 · energy_r8 · (1 − trace / max(trace))``: high when the head
  carries little of the largest head's Fisher mass and its spectrum is concentrated.
- ``efficiency_score = 100 / (1 + log10(cond))`` with ``cond ≥ 1`` the condition number of the
  nonzero spectrum: 100 for a flat spectrum (information spread evenly over the directions the
  head uses, easy to optimise), 50 at cond 10, 25 at cond 1000, 0 for an undefined or infinite cond.

The run's ``compression_potential`` and ``efficiency_score`` are the means over its heads.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from pydantic import Field, model_validator

from tensorscope_core.plugin_api import Params

CATEGORIES = ("high_potential", "moderate", "critical")  # codes 0, 1, 2 of the ``category`` grid
METRICS = ("trace", "eigmax", "cond", "energy_r8", "energy_r16", "effective_rank")


class HotspotParams(Params):
    critical_trace_ratio: float = Field(2.0, gt=0.0, description="critical when trace ≥ this × median head trace")
    critical_eigmax_ratio: float = Field(3.0, gt=0.0,
                                         description="critical when eigmax ≥ this × median head eigmax")
    potential_trace_ratio: float = Field(0.5, gt=0.0, description="high_potential needs trace ≤ this × median")
    potential_energy_r8: float = Field(0.9, ge=0.0, le=1.0,
                                       description="high_potential needs energy_r8 ≥ this (spectrum concentrated)")
    top_k: int = Field(3, ge=1, description="hotspots listed per kind (top trace, eigmax, cond)")

    @model_validator(mode="after")
    def _ordered(self) -> HotspotParams:
        if self.potential_trace_ratio >= self.critical_trace_ratio:
            raise ValueError(f"potential_trace_ratio ({self.potential_trace_ratio}) must be below "
                             f"critical_trace_ratio ({self.critical_trace_ratio})")
        return self


@dataclass(frozen=True)
class HeadStats:
    layer: int
    head: int
    trace: float | None
    eigmax: float | None
    cond: float | None
    energy_r8: float | None
    energy_r16: float | None
    effective_rank: float | None


@dataclass(frozen=True)
class Verdict:
    category: str
    trace_ratio: float
    eigmax_ratio: float
    compression_potential: float
    efficiency_score: float


def _ratio(x: float, median: float) -> float:
    if median > 0:
        return x / median
    return math.inf if x > 0 else 0.0


def efficiency_score(cond: float | None) -> float:
    """100 / (1 + log10(cond)); 0 for an undefined (null) or infinite condition number."""
    if cond is None or not math.isfinite(cond):
        return 0.0
    return 100.0 / (1.0 + math.log10(max(cond, 1.0)))


def classify(heads: list[HeadStats], params: HotspotParams) -> list[Verdict]:
    """One verdict per head, in the order given (see the module docstring for the rules)."""
    traces = [h.trace or 0.0 for h in heads]
    eigmaxes = [h.eigmax or 0.0 for h in heads]
    median_trace, median_eigmax = statistics.median(traces), statistics.median(eigmaxes)
    top = max(traces)
    verdicts = []
    for h, trace, eigmax in zip(heads, traces, eigmaxes, strict=True):
        energy = h.energy_r8 if h.energy_r8 is not None else (1.0 if trace == 0 else 0.0)
        t_ratio, e_ratio = _ratio(trace, median_trace), _ratio(eigmax, median_eigmax)
        if t_ratio >= params.critical_trace_ratio or e_ratio >= params.critical_eigmax_ratio:
            category = "critical"
        elif t_ratio <= params.potential_trace_ratio and energy >= params.potential_energy_r8:
            category = "high_potential"
        else:
            category = "moderate"
        potential = 100.0 * energy * (1.0 - trace / top) if top > 0 else 100.0 * energy
        verdicts.append(Verdict(category, t_ratio, e_ratio, potential, efficiency_score(h.cond)))
    return verdicts


def top_heads(heads: list[HeadStats], metric: str, k: int) -> list[HeadStats]:
    """The k heads with the largest finite ``metric`` (ties by layer, then head)."""
    scored = [h for h in heads if getattr(h, metric) is not None and math.isfinite(getattr(h, metric))]
    return sorted(scored, key=lambda h: (-getattr(h, metric), h.layer, h.head))[:k]
