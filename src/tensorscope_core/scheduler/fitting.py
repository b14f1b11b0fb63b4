"""The plans of one model and of the model-set stage, fitted into the run's budget (see ``ladder``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import NamedTuple

import torch

from ..config import RunConfig
from ..errors import BadParameterError
from ..machine import Budget
from ..metric import ASKED, Rung, RunShape
from ..models.view import ModelView
from ..plugins import Registry
from ..results.schema import Cost
from .graph import MetricNode
from .ladder import Ladders, fit, make_ladders, rungs_of
from .plan import CostKey, ModelPlan, ModelSetPlan, cost_key, make_plan, make_set_plan


def check_pins(nodes: Sequence[MetricNode], config: RunConfig) -> None:
    """Every pinned rung names a metric of this run."""
    names = {n.name for n in nodes}
    for metric in config.rungs:
        if metric not in names:
            raise BadParameterError(f"a rung is pinned for '{metric}', which this run does not compute",
                                    "pin rungs of the metrics the run computes (--rung METRIC=RUNG)")


def _pins(nodes: Sequence[MetricNode], config: RunConfig, scope: str) -> dict[str, str]:
    of_scope = {n.name for n in nodes if n.cls.scope == scope and n.planned}
    return {m: r for m, r in config.rungs.items() if m in of_scope}


def _choices(nodes: Sequence[MetricNode], ladders: Ladders, scope: str) -> tuple[dict[str, str], dict[str, str]]:
    rungs = {n.name: f"{n.rung.name} ({n.rung.accuracy}; {n.rung.chosen_by})" for n in nodes
             if n.cls.scope == scope and n.rung is not None}
    left_out = {n.name: n.over_budget for n in nodes if n.cls.scope == scope and n.over_budget}
    return rungs, left_out


def fit_model_plan(nodes: Sequence[MetricNode], view: ModelView, shape: RunShape, registry: Registry,
                   budget: Budget, config: RunConfig,
                   floor: Ladders | None = None) -> tuple[list[MetricNode], ModelPlan, Ladders]:
    """One model's plan within ``budget``: its metrics at their rungs (``floor``: the levels an earlier
    model of the run ended at), those that cannot fit left out."""
    with view.planning():  # the model does not change while it is planned: sizes read from it are kept
        return _fit_model_plan(nodes, view, shape, registry, budget, config, floor)


def _fit_model_plan(nodes: Sequence[MetricNode], view: ModelView, shape: RunShape, registry: Registry,
                    budget: Budget, config: RunConfig,
                    floor: Ladders | None) -> tuple[list[MetricNode], ModelPlan, Ladders]:
    on_view = [n for n in nodes if n.cls.scope == "model" and (view.device_map is None or n.cls.supports_dispatch)]
    ladders = make_ladders(on_view, lambda n: n.model_cls.ladder(n.params, view, shape),
                           _pins(on_view, config, "model"), floor)
    for n in on_view:  # a declaration that raises leaves its metric out, not the run
        try:
            n.model_cls.cost(n.params, view, shape)
        except Exception as exc:
            ladders.left_out.setdefault(n.name, f"left out: its declared cost raised {type(exc).__name__}: {exc} "
                                                f"(report it to {n.plugin})")
    by_name = {n.name: n for n in nodes}
    memo: dict[CostKey, tuple[Cost, dict[str, int]]] = {}

    def make(ns: list[MetricNode]) -> ModelPlan:
        return make_plan(ns, view, shape, registry, budget.nbytes, config.min_micro_batch, memo,
                         results_on_host=torch.device(config.device).type != "cpu")

    def heavy(plan: ModelPlan) -> list[str]:
        peak = max(plan.passes, key=lambda p: p.peak_bytes, default=None)
        return [] if peak is None else sorted(
            peak.metrics, key=lambda m: -plan.declared_state.get(m, 0) - plan.declared_results.get(m, 0)
            - max(plan.declared_transient.get(m, 0), plan.declared_finalize.get(m, 0)))

    def state(name: str, rung: Rung) -> int:  # the rung alone: its dependencies as asked
        node = replace(by_name[name], params=rung.params, over_budget=None)
        key = cost_key(node, {})
        if key not in memo:
            make([node])
        cost = memo[key][0]
        return cost.state_bytes + max(cost.transient_bytes, cost.finalize_bytes) + cost.result_bytes

    final, model_plan = fit(nodes, ladders, make, heavy, state, budget.nbytes, config.strict_budget)
    model_plan.budget_source = budget.source
    model_plan.rungs, model_plan.left_out = _choices(final, ladders, "model")
    model_plan.notes.extend(f"{name}: its memory ladder failed ({why}), so it can only run as asked"
                            for name, why in ladders.broken.items())
    return final, model_plan, ladders


class SetRungCost(NamedTuple):
    """One rung of a model-set metric with its declared state and working memory, sized on one member."""

    rung: Rung
    state: int
    transient: int
    results: int

    @property
    def nbytes(self) -> int:
        return self.state + self.transient + self.results


def set_rung_costs(nodes: Sequence[MetricNode], view: ModelView, shape: RunShape) -> dict[str, list[SetRungCost]]:
    """Each runnable model-set metric's rungs with their declared state and working memory."""
    out: dict[str, list[SetRungCost]] = {}
    for n in nodes:
        if n.planned and n.cls.scope == "model_set":
            try:
                rungs = rungs_of(n, lambda m: m.set_cls.ladder(m.params, view, shape))
            except Exception:  # a broken ladder: as asked only, as for per-model metrics
                rungs = [Rung(ASKED, n.params, "as asked")]
            costs = [(r, n.cls.cost(r.params, view, shape)) for r in rungs]
            out[n.name] = [SetRungCost(r, c.state_bytes, max(c.transient_bytes, c.finalize_bytes), c.result_bytes)
                           for r, c in costs]
    return out


def fit_set_plan(nodes: Sequence[MetricNode], costs: Mapping[str, list[SetRungCost]],
                 members: Sequence[ModelPlan], member_weights: Sequence[int], budget: Budget, config: RunConfig,
                 own_passes: dict[str, dict[str, int]]) -> tuple[list[MetricNode], ModelSetPlan | None]:
    """The model-set stage's plan within ``budget``, its metrics stepped down or left out as needed."""
    if not any(n.cls.scope == "model_set" for n in nodes):
        return list(nodes), None
    ladders = make_ladders([n for n in nodes if n.name in costs], lambda n: [c.rung for c in costs[n.name][1:]],
                           _pins(nodes, config, "model_set"))

    def cost(name: str, rung_name: str) -> SetRungCost:
        return next(c for c in costs[name] if c.rung.name == rung_name)

    def make(ns: list[MetricNode]) -> ModelSetPlan:
        chosen = {n.name: cost(n.name, n.rung.name if n.rung else ASKED) for n in ns if n.planned and n.name in costs}
        plan = make_set_plan(ns, members, member_weights, {m: c.state for m, c in chosen.items()}, budget.nbytes,
                             own_passes, {m: c.transient for m, c in chosen.items()},
                             {m: c.results for m, c in chosen.items()})
        assert plan is not None
        return plan

    def nbytes(name: str, rung_name: str) -> int:
        return cost(name, rung_name).nbytes

    final, set_plan = fit(nodes, ladders, make,
                          lambda p: sorted(ladders.rungs, key=lambda m: -nbytes(m, ladders.rung(m).name)),
                          lambda name, rung: nbytes(name, rung.name), budget.nbytes, config.strict_budget)
    set_plan.budget_source = budget.source
    set_plan.rungs, set_plan.left_out = _choices(final, ladders, "model_set")
    return final, set_plan
