"""Fitting a run into its memory budget: smaller micro-batches first (they cost only time), then the
metrics' ladders of cheaper settings (they cost accuracy, said per rung), then leaving metrics out
(with the reason and the fix); a refusal only when nothing requested fits.

Stepping is greedy: while the plan is over budget, the metric of the heaviest pass whose next rung
saves the most declared state steps down one rung; when no step is left there, the metric whose
removal lowers the peak most is left out, with the metrics that need it. Afterwards every stepped
metric climbs back up as far as the plan still fits, so each ends at the most accurate rung that fits
beside the others. Levels only ever go down from one model of a run to the next, so the models of
one run are measured with the same settings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol, TypeVar

from ..config import format_bytes
from ..errors import BadParameterError
from ..metric import ASKED, Rung
from ..results.schema import RungRecord
from .graph import MetricNode


class _Plan(Protocol):
    @property
    def peak_bytes(self) -> int: ...

    @property
    def fits(self) -> bool: ...


PlanT = TypeVar("PlanT", bound=_Plan)
#: how the reason of a metric left out for memory begins
LEFT_OUT = "left out for memory:"


@dataclass
class Ladders:
    """Each planned metric's rungs (the asked parameters first) and the level it runs at."""

    rungs: dict[str, list[Rung]]
    levels: dict[str, int] = field(default_factory=dict)
    pinned: set[str] = field(default_factory=set)
    #: metric -> why it was left out of the run
    left_out: dict[str, str] = field(default_factory=dict)
    #: metric -> the error its ``ladder`` raised (it runs as asked or is left out; the plan says so)
    broken: dict[str, str] = field(default_factory=dict)

    def rung(self, name: str) -> Rung:
        return self.rungs[name][self.levels.get(name, 0)]


def rungs_of(node: MetricNode, size_on: Callable[[MetricNode], Sequence[Rung]]) -> list[Rung]:
    """``node``'s ladder, its asked parameters first; a ladder that raises, or names a rung twice or
    'asked', gives the asked rung only (the caller notes why)."""
    cheaper = list(size_on(node))
    names = [r.name for r in cheaper]
    if ASKED in names or len(set(names)) != len(names):
        raise ValueError(f"its rungs {names} must be named once each, none '{ASKED}'")
    return [Rung(ASKED, node.params, "as asked"), *cheaper]


def make_ladders(nodes: Sequence[MetricNode], size_on: Callable[[MetricNode], Sequence[Rung]],
                 pins: Mapping[str, str], floor: Ladders | None = None) -> Ladders:
    """The ladders of the planned ``nodes``, starting at the pins and at ``floor`` (the levels an
    earlier model of the run ended at)."""
    ladders = Ladders({})
    for n in nodes:
        if not n.planned:
            continue
        try:
            ladders.rungs[n.name] = rungs_of(n, size_on)
        except Exception as exc:  # one metric's broken ladder must not stop the run
            ladders.rungs[n.name] = [Rung(ASKED, n.params, "as asked")]
            ladders.broken[n.name] = f"{type(exc).__name__}: {exc}"
    for metric, wanted in pins.items():
        if metric not in ladders.rungs:
            raise BadParameterError(f"a rung is pinned for '{metric}', which this run does not plan",
                                    "pin rungs of the metrics the run computes (--rung METRIC=RUNG)")
        names = [r.name for r in ladders.rungs[metric]]
        if wanted not in names:
            raise BadParameterError(f"{metric} has no rung '{wanted}'", f"its rungs: {', '.join(names)}")
        ladders.levels[metric] = names.index(wanted)
        ladders.pinned.add(metric)
    if floor is not None:
        for name, level in floor.levels.items():
            if name in ladders.rungs and name not in ladders.pinned:
                ladders.levels[name] = max(level, ladders.levels.get(name, 0))
        ladders.left_out.update(floor.left_out)
    return ladders


def apply(nodes: Sequence[MetricNode], ladders: Ladders) -> list[MetricNode]:
    """``nodes`` at their rungs, those left out marked (with the metrics that need them)."""
    out = []
    for node in nodes:
        if node.name in ladders.left_out:
            out.append(replace(node, over_budget=ladders.left_out[node.name]))
            continue
        if node.name not in ladders.rungs:
            out.append(node)
            continue
        rung = ladders.rung(node.name)
        record = None if rung.name == ASKED else RungRecord(
            name=rung.name, accuracy=rung.accuracy, chosen_by="pinned" if node.name in ladders.pinned else "budget")
        out.append(replace(node, params=rung.params, rung=record))
    return out


def _dependents(nodes: Sequence[MetricNode], name: str) -> list[str]:
    """The metrics that need ``name``, directly or through others."""
    found: list[str] = []
    todo = [name]
    while todo:
        current = todo.pop()
        for n in nodes:
            if current in n.needs and n.name not in found:
                found.append(n.name)
                todo.append(n.name)
    return found


def fit(nodes: Sequence[MetricNode], ladders: Ladders, make: Callable[[list[MetricNode]], PlanT],
        heavy: Callable[[PlanT], Sequence[str]], state: Callable[[str, Rung], int], budget: int,
        strict: bool) -> tuple[list[MetricNode], PlanT]:
    """Step ``ladders`` down (then leave metrics out) until ``make``'s plan fits, then climb back.

    ``heavy(plan)``: the metrics whose state counts in the plan's peak; ``state(name, rung)``:
    the declared state of a metric at a rung.
    """
    plan = make(apply(nodes, ladders))
    bare = Ladders(ladders.rungs, dict(ladders.levels), ladders.pinned, {m: "trial" for m in ladders.rungs})
    if strict or plan.fits or not make(apply(nodes, bare)).fits:  # as asked, or not even without every metric
        return apply(nodes, ladders), plan
    stepped: list[str] = []
    while not plan.fits:
        candidates = [m for m in heavy(plan) if m in ladders.rungs and m not in ladders.pinned
                      and m not in ladders.left_out and ladders.levels.get(m, 0) + 1 < len(ladders.rungs[m])]
        savings = {m: state(m, ladders.rung(m)) - state(m, ladders.rungs[m][ladders.levels.get(m, 0) + 1])
                   for m in candidates}
        best = max(savings, key=lambda m: savings[m], default=None)
        if best is not None and savings[best] > 0:
            ladders.levels[best] = ladders.levels.get(best, 0) + 1
            stepped.append(best)
        elif not _leave_out_heaviest(nodes, ladders, make, heavy(plan), budget):
            break
        plan = make(apply(nodes, ladders))
    _readmit(nodes, ladders, make)
    for name in sorted(set(stepped), key=lambda m: -state(m, ladders.rung(m))):
        while ladders.levels.get(name, 0) > 0 and name not in ladders.left_out:
            ladders.levels[name] -= 1
            if not make(apply(nodes, ladders)).fits:
                ladders.levels[name] += 1
                break
    final = apply(nodes, ladders)
    return final, make(final)


def _leave_out_heaviest(nodes: Sequence[MetricNode], ladders: Ladders, make: Callable[[list[MetricNode]], PlanT],
                        heavy: Sequence[str], budget: int) -> bool:
    """Leave out the fewest metrics whose leaving makes the plan fit; while none does, what lowers the peak
    most per metric left out: one metric, or every metric reading one artifact (a shared artifact, e.g.
    per-example gradients, goes only when all its readers go). False when nothing is left to remove."""
    candidates = [m for m in heavy if m in ladders.rungs and m not in ladders.left_out]
    if not candidates:
        return False
    by_name = {n.name: n for n in nodes}
    options: dict[tuple[str, ...], str | None] = {(m,): None for m in candidates}
    for artifact in sorted({a for m in candidates for a in by_name[m].cls.artifacts} - {"weights"}):
        readers = tuple(m for m in candidates if artifact in by_name[m].cls.artifacts)
        if len(readers) > 1:
            options.setdefault(readers, artifact)
    now = make(apply(nodes, ladders)).peak_bytes

    def peak_without(group: tuple[str, ...]) -> int:
        trial = Ladders(ladders.rungs, dict(ladders.levels), ladders.pinned, dict(ladders.left_out))
        trial.left_out.update({m: "trial" for m in group})
        return make(apply(nodes, trial)).peak_bytes

    saving = {group: now - peak_without(group) for group in options}
    enough = [g for g in options if now - saving[g] <= budget]
    if enough:  # the fewest metrics whose leaving makes the plan fit
        group = min(enough, key=lambda g: (len(g), -saving[g]))
    elif max(saving.values()) > 0:  # the most bytes per metric left out
        group = max(options, key=lambda g: (saving[g] / len(g), -len(g)))
    else:
        group = max(options, key=len)
    for victim in group:
        _leave_out(nodes, ladders, make, victim, options[group], budget)
    return True


def _readmit(nodes: Sequence[MetricNode], ladders: Ladders, make: Callable[[list[MetricNode]], PlanT]) -> None:
    """Put back each left-out metric (with the metrics left out for needing it) that fits beside the others
    after all: a group left out while the plan was far over may have made room a later choice did not need.
    The metrics that need least alone go first."""
    by_name = {n.name: n for n in nodes}
    own = [m for m, why in ladders.left_out.items() if m in by_name and not why.startswith(f"{LEFT_OUT} it needs")]
    for victim in sorted(own, key=lambda m: (make(apply([by_name[m]], ladders)).peak_bytes, m)):
        back = {victim: ladders.left_out.pop(victim)}
        for m in _dependents(nodes, victim):  # those that need nothing else left out come back with it
            if m in ladders.left_out and not any(d in ladders.left_out for d in by_name[m].needs):
                back[m] = ladders.left_out.pop(m)
        if not make(apply(nodes, ladders)).fits:
            ladders.left_out.update(back)


def _leave_out(nodes: Sequence[MetricNode], ladders: Ladders, make: Callable[[list[MetricNode]], PlanT],
               victim: str, artifact: str | None, budget: int) -> None:
    """Mark ``victim`` (and the metrics that need it) left out, with its peak alone and the fix."""
    node = next(n for n in nodes if n.name == victim)
    alone = make(apply([node], ladders)).peak_bytes
    rung = ladders.rung(victim)
    setting = "as asked" if rung.name == ASKED else f"at its cheapest rung '{rung.name}'"
    if alone <= budget:
        fix = f"run it on its own (--metrics {victim}), or raise --memory-budget"
    else:
        fix = f"raise --memory-budget to at least {format_bytes(alone)}, or lower --batch-size / --max-length"
    what = "it" if artifact is None else f"the '{artifact}' artifact it reads (with its other readers)"
    ladders.left_out[victim] = (
        f"{LEFT_OUT} {what} does not fit in the budget of {format_bytes(budget)} beside the other metrics "
        f"{setting} (alone the plan needs {format_bytes(alone)}). Fix: {fix}")
    for dependent in _dependents(nodes, victim):
        ladders.left_out.setdefault(dependent, f"{LEFT_OUT} it needs '{victim}', which was left out")
