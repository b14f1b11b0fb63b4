"""The FIM hotspot rules: a category and two 0-100 scores per attention head, from its Fisher spectrum.

The rules are the FIM analysis workflow's:

- ``trace_fraction = trace / max(trace)`` over the run's heads (the normalised trace).
- ``critical`` (protect: the head holds as much Fisher mass as the most sensitive one) when
  ``trace_fraction > critical_trace_fraction`` (0.95; strict, as the workflow writes it).
- else ``high_potential`` (compress first) when the condition number *and* the low-rank energy are
  high: ``cond ≥ median cond`` of the run's heads (undefined conds left out, an infinite one counts as
  the largest) and ``energy_r8 ≥ potential_energy_r8`` (0.9). Both boundaries are inclusive. The two
  thresholds differ on purpose: energy_r8 is a share with a meaning of its own (≥ 0.9 means a rank-8
  approximation keeps 90% of the Fisher mass, i.e. effective rank ≤ 8), while a condition number has
  no scale-free "high": it grows with the parameters and examples, so it is high against the run's own
  heads (the upper half). A head with no Fisher mass (trace 0: the loss does not see it) is
  high_potential too: removing it changes nothing.
- else ``moderate``.

Scores per head, on 0-100:

- ``compression_potential = 100 · energy_r8 · L / (1 + L)`` with ``L = log10(cond)``: rises with the
  share of the Fisher mass in the top 8 directions and with the condition number (0 for a flat spectrum,
  50 · energy_r8 at cond 10, 75 · energy_r8 at cond 1000, 100 · energy_r8 for an infinite one); 100 for
  a head with no Fisher mass; 0 for a head whose cond or energy is undefined while its trace is not 0.
- ``efficiency_score = 100 · (1 − trace / max(trace))``: falls with the trace, from 100 for a head
  the loss does not see to 0 for the head with the most Fisher mass (how cheaply the head can be
  changed). 100 for every head when no head has Fisher mass.

The run's ``compression_potential`` and ``efficiency_score`` are the means over its heads.

Until version 1 the rules were ratios to the median head (critical at trace ≥ 2x or eigmax ≥ 3x the
median, high_potential at trace ≤ 0.5x the median with energy_r8 ≥ 0.9; potential ignored cond and
efficiency came from cond). They are not kept: they answered another question (which heads stand out
from the typical one) than the workflow's, and the same effect is had here by lowering
``critical_trace_fraction`` (e.g. 0.5 protects every head with at least half the top head's mass).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from pydantic import Field

from tensorscope_core.plugin_api import Params

CATEGORIES = ("high_potential", "moderate", "critical")  # codes 0, 1, 2 of the ``category`` grid
METRICS = ("trace", "eigmax", "cond", "energy_r8", "energy_r16", "effective_rank")


class HotspotParams(Params):
    critical_trace_fraction: float = Field(0.95, ge=0.0, lt=1.0,
                                           description="critical when trace / max head trace > this")
    potential_energy_r8: float = Field(0.9, ge=0.0, le=1.0,
                                       description="high_potential needs energy_r8 ≥ this (and cond ≥ the "
                                                   "median head's)")
    top_k: int = Field(3, ge=1, description="hotspots listed per kind (top trace, eigmax, cond)")


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
    trace_fraction: float
    compression_potential: float
    efficiency_score: float


def _at_least(x: float | None, bound: float | None) -> bool:
    """x ≥ bound, False where either is undefined."""
    return x is not None and bound is not None and not math.isnan(x) and x >= bound


def median_cond(heads: list[HeadStats]) -> float | None:
    """The median of the defined condition numbers (inf included), the high_potential bound."""
    conds = [h.cond for h in heads if h.cond is not None and not math.isnan(h.cond)]
    return statistics.median(conds) if conds else None


def compression_potential(trace: float, cond: float | None, energy_r8: float | None) -> float:
    """100 · energy_r8 · L / (1 + L), L = log10(cond) (see the module docstring for the edge cases)."""
    if trace == 0:
        return 100.0
    if cond is None or energy_r8 is None or math.isnan(cond) or math.isnan(energy_r8):
        return 0.0
    if math.isinf(cond):
        return 100.0 * energy_r8
    log_cond = math.log10(max(cond, 1.0))
    return 100.0 * energy_r8 * log_cond / (1.0 + log_cond)


def efficiency_score(trace: float, max_trace: float) -> float:
    """100 · (1 − trace / max trace); 100 when no head has Fisher mass."""
    return 100.0 * (1.0 - trace / max_trace) if max_trace > 0 else 100.0


def classify(heads: list[HeadStats], params: HotspotParams) -> list[Verdict]:
    """One verdict per head, in the order given (see the module docstring for the rules)."""
    traces = [h.trace or 0.0 for h in heads]
    top, cond_bound = max(traces), median_cond(heads)
    verdicts = []
    for h, trace in zip(heads, traces, strict=True):
        fraction = trace / top if top > 0 else 0.0
        if fraction > params.critical_trace_fraction:
            category = "critical"
        elif trace == 0 or (_at_least(h.cond, cond_bound) and _at_least(h.energy_r8, params.potential_energy_r8)):
            category = "high_potential"
        else:
            category = "moderate"
        verdicts.append(Verdict(category, fraction, compression_potential(trace, h.cond, h.energy_r8),
                                efficiency_score(trace, top)))
    return verdicts


def top_heads(heads: list[HeadStats], metric: str, k: int) -> list[HeadStats]:
    """The k heads with the largest finite ``metric`` (ties by layer, then head)."""
    scored = [h for h in heads if getattr(h, metric) is not None and math.isfinite(getattr(h, metric))]
    return sorted(scored, key=lambda h: (-getattr(h, metric), h.layer, h.head))[:k]
