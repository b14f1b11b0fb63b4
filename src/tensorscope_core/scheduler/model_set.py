"""Execute the model-set stage: metrics over all members of a run, after every member's own.

Runs on the same ``Executor`` as per-model metrics, so admission, the cache, fail_fast, the
time limit, declared and measured bytes and the skip/error rules are the same.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..data import PreparedData
from ..metric import RunShape
from ..models.view import ModelView
from ..results.schema import MetricResult
from ..results.store import cache_key
from .graph import MetricNode
from .passes import check_declared
from .run import METRIC_FAULTS, ActiveMetric, Executor, needed_tensors


@dataclass(kw_only=True)
class ModelSetRunner(Executor):
    """Runs the model-set metrics of a run over its members' views and per-model results."""

    nodes: Sequence[MetricNode]
    views: Mapping[str, ModelView]
    per_model: Mapping[str, Mapping[str, MetricResult]]
    #: each member's cache key of each per-model metric, so a set metric's key follows its inputs
    member_keys: Mapping[str, Mapping[str, str]]
    fingerprints: Mapping[str, tuple[str, str | None]]
    shape: RunShape
    declared: Mapping[str, int]
    base_name: str | None = None
    data: Mapping[str, PreparedData] | None = None

    @property
    def where(self) -> str:
        return "*"

    @property
    def label(self) -> str:
        return "the model set"

    def _key(self, node: MetricNode) -> str:
        return cache_key(members=sorted((name, *fp) for name, fp in self.fingerprints.items()), base=self.base_name,
                         metric=node.name, version=node.cls.version, params=node.params.model_dump(mode="json"),
                         config=self.config.numeric_key(),
                         deps=sorted(keys.get(d, "") for keys in self.member_keys.values() for d in node.needs))

    def run(self) -> dict[str, MetricResult]:
        with self.counter.active():
            for node in self.nodes:
                if node.cls.scope != "model_set":
                    continue
                active = self._admit(node)
                if active is not None:
                    self._finish_one(active, functools.partial(active.instance.compute_set, self.views,
                                                               self.per_model))
        self._report_rest("model_set", self.nodes)
        return self.results

    def _admit(self, node: MetricNode) -> ActiveMetric | None:
        cls = node.set_cls
        self.keys[node.name] = self._key(node)
        if self._not_planned(node):
            return None
        if self._dependency_failed(node, self.per_model) or self._cached(node):
            return None
        if cls.needs_base and self.base_name is None:
            self.results[node.name] = self._result(node, "skipped", reason=(
                f"{node.name} compares fine-tunes with their base model and this run has none: "
                f"pass base=... (CLI --base BASE_MODEL)"))
            return None
        if len(self.views) < cls.min_models:
            self.results[node.name] = self._result(node, "skipped", reason=(
                f"{node.name} compares models: pass at least {cls.min_models} models to analyze() "
                f"(got {len(self.views)})"))
            return None
        active = ActiveMetric(node, None, self.declared.get(node.name, 0))
        try:
            first = next(iter(self.views.values()))
            active.own_passes = check_declared(
                cls.own_passes(node.params, first, self.shape, list(self.views), self.base_name), node.name)
            reason = self._call(active, lambda: cls.set_skip_reason(node.params, self.views, self.base_name))
            if reason is not None:
                self.results[node.name] = self._result(node, "skipped", reason=reason)
                return None
            needed = needed_tensors((metrics[dep] for metrics in self.per_model.values() for dep in node.needs
                                     if dep in metrics), self.tensors)
            active.instance = self._call(active, lambda: cls(node.params, self.shape, needed,
                                                                  base_name=self.base_name, data=self.data))
        except METRIC_FAULTS as exc:
            self._fail(active, exc)
            return None
        return active
