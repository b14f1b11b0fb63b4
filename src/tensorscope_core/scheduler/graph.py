"""Resolve requested metric names into a validated, ordered graph (before any model loads)."""

from __future__ import annotations

import fnmatch
import graphlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import (
    BadParameterError,
    MetricCycleError,
    UnknownMetricError,
    UsageError,
    close_matches,
    did_you_mean,
)
from ..metric import Metric, MetricClass, ModelSetMetric
from ..plugins import Registry
from ..results.schema import RungRecord


@dataclass(frozen=True)
class MetricNode:
    """One metric to run, with validated params and its stage (0 = needs no other metric)."""

    name: str
    cls: MetricClass
    params: BaseModel
    plugin: str
    stage: int
    unavailable: str | None = None  # why it cannot run (missing dependency or artifact)
    needs: tuple[str, ...] = ()  # metrics it reads (Metric.metric_needs for its params)
    #: the ladder rung ``params`` come from, when not as asked (chosen by the planner or pinned)
    rung: RungRecord | None = None
    #: why the planner left it out of the run (over the memory budget even at its cheapest rung)
    over_budget: str | None = None

    @property
    def planned(self) -> bool:
        """Whether the plan counts it: available, and not left out for memory."""
        return self.unavailable is None and self.over_budget is None

    @property
    def model_cls(self) -> type[Metric]:
        """The class of a per-model metric (the scheduler runs it per model only)."""
        if not issubclass(self.cls, Metric):
            raise TypeError(f"{self.name} is not a per-model metric")
        return self.cls

    @property
    def set_cls(self) -> type[ModelSetMetric]:
        """The class of a model-set metric (run once, over every member)."""
        if not issubclass(self.cls, ModelSetMetric):
            raise TypeError(f"{self.name} is not a model-set metric")
        return self.cls


def validate_params(cls: MetricClass, raw: Mapping[str, Any]) -> BaseModel:
    try:
        return cls.Params(**raw)
    except ValidationError as exc:
        known = list(cls.Params.model_fields)
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            hint = did_you_mean(field, known) if err["type"] == "extra_forbidden" else ""
            problems.append(f"{field}: {err['msg']}" + (f" ({hint})" if hint else ""))
        raise BadParameterError(f"bad parameters for {cls.name}: " + "; ".join(problems),
                                f"`tensorscope explain {cls.name}` lists its parameters: {known or 'none'}") from exc


def _names(requested: object) -> list[str]:
    """The metric names asked for: a name, comma-separated names (as the CLI takes them), or a list of
    names; never none."""
    items = requested.split(",") if isinstance(requested, str) else requested
    if not isinstance(items, (list, tuple)) or not all(isinstance(n, str) for n in items):
        raise UsageError(f"metrics must be a name, a list of names or 'all', got {requested!r}",
                         'pass e.g. metrics=["basic.loss", "basic.grad_norms"] '
                         "(CLI: --metrics basic.loss,basic.grad_norms)")
    names = list(dict.fromkeys(n.strip() for n in items if n.strip()))
    if not names:
        raise UsageError("no metric was asked for", "name at least one metric, or 'all' "
                         "(`tensorscope metrics` lists them)")
    return names


GLOB_CHARS = frozenset("*?[")


def expand_globs(names: Sequence[str], registry: Registry) -> list[str]:
    """``fisher.*``-style patterns -> the registered metrics they match (in name order), other names
    as given: family selection without listing a family's metrics. A pattern matching nothing is an
    UnknownMetricError naming the families and metrics it looks like."""
    known = sorted(registry.metrics)
    out: list[str] = []
    for name in names:
        if not GLOB_CHARS & set(name):
            out.append(name)
            continue
        matched = fnmatch.filter(known, name)
        if not matched:
            stem = name.split("*")[0].rstrip(".")
            families = sorted({f"{m.split('.')[0]}.*" for m in known})
            like = [f"{f}.*" for f in close_matches(stem, [f[:-2] for f in families])] or close_matches(stem, known)
            hint = f"did you mean {', '.join(repr(m) for m in like)}?" if like else ""
            raise UnknownMetricError(f"the pattern '{name}' matches no installed metric"
                                     + (f": {hint}" if hint else ""),
                                     f"families installed: {', '.join(families)}; `tensorscope metrics` lists "
                                     "every metric (pip install 'tensorscope[<family>]' adds a family)")
        out.extend(matched)
    return list(dict.fromkeys(out))


def _check_params_shape(params: object, registry: Registry) -> None:
    """params is {metric name: {field: value}}: anything else is refused here, not deep in pydantic."""
    if not isinstance(params, Mapping):
        raise BadParameterError(f"params must map metric names to their parameters, got {type(params).__name__}",
                                'pass e.g. params={"basic.loss": {...}}')
    for name, raw in params.items():
        registry.metric(name)  # an unknown name: UnknownMetricError with suggestions
        if not isinstance(raw, Mapping):
            raise BadParameterError(f"the parameters of {name} must be a mapping of field to value, got {raw!r}",
                                    f"pass params={{{name!r}: {{FIELD: VALUE}}}} (`tensorscope explain {name}` "
                                    "lists its fields)")


def resolve(requested: str | Sequence[str], params: Mapping[str, Mapping[str, Any]],
            registry: Registry) -> list[MetricNode]:
    """Expand family patterns (``fisher.*``) and dependencies, validate names and params, detect
    cycles, order topologically."""
    names = sorted(registry.metrics) if requested == "all" or requested == ["all"] \
        else expand_globs(_names(requested), registry)
    for name in names:
        registry.metric(name)  # raises UnknownMetricError with suggestions
    _check_params_shape(params, registry)
    graph: dict[str, set[str]] = {}
    unavailable: dict[str, str] = {}
    validated: dict[str, BaseModel] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        if name in graph:
            continue
        cls = registry.metrics[name]
        graph[name] = set()
        validated[name] = validate_params(cls, params.get(name, {}))
        for dep in cls.metric_needs(validated[name]):
            if dep not in registry.metrics:
                family = dep.split(".")[0]
                unavailable[name] = (f"needs metric '{dep}', which no installed plugin provides: "
                                     f"pip install 'tensorscope[{family}]'")
                continue
            if cls.scope == "model" and registry.metrics[dep].scope == "model_set":
                unavailable[name] = (f"needs '{dep}', a model-set metric, which finishes only after every "
                                     "model has run: a per-model metric cannot read it")
                continue
            graph[name].add(dep)
            todo.append(dep)
        missing = [a for a in cls.artifacts if a not in registry.artifacts]
        if missing and name not in unavailable:
            hint = "; ".join(f"'{a}'" + (f" ({did_you_mean(a, registry.artifacts)})"
                                           if close_matches(a, registry.artifacts) else "") for a in missing)
            unavailable[name] = f"needs artifact(s) {hint} that no installed plugin provides"
    stray = sorted(set(params) - set(graph))
    if stray:
        raise BadParameterError(f"parameters given for {', '.join(stray)}, which this run does not compute",
                                "add the metric to the metrics asked for, or drop its parameters")
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        cycle = " -> ".join(exc.args[1])
        raise MetricCycleError(f"metric dependencies form a cycle: {cycle}",
                               "a metric cannot need itself through other metrics; report it to the plugin") from exc
    stage: dict[str, int] = {}
    nodes = []
    for name in order:
        stage[name] = 1 + max((stage[d] for d in graph[name]), default=-1)
        cls = registry.metrics[name]
        nodes.append(MetricNode(name, cls, validated[name], registry.metric_plugin[name], stage[name],
                                unavailable.get(name), tuple(sorted(graph[name]))))
    return sorted(nodes, key=lambda n: (n.stage, n.name))
