"""Execute one model's plan: shared passes, failure isolation, time limits, OOM retry, cache."""

from __future__ import annotations

import functools
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import ValidationError

from ..artifacts import PARAM_GRAD, ArtifactSpec
from ..capture import (
    CaptureContext,
    backpropagate,
    capture_scope,
    combine_micro,
    detach_all,
    embedding_output,
    tensor_bytes,
)
from ..config import RunConfig
from ..core_artifacts import LossTargets, loss_targets
from ..data import Batch, PreparedData
from ..errors import MetricTimeoutError, NotApplicable, PluginError, TensorScopeError
from ..metric import RunShape, Step
from ..models.view import ModelView
from ..plugins import Registry
from ..process_memory import trim
from ..results.schema import MetricResult, ScalarValue, SeriesValue, TensorValue
from ..results.store import ResultCache, cache_key
from .graph import MetricNode
from .passes import PassCounter, check_declared
from .plan import ModelPlan, closure, dependency_params, merged_requests, pass_kind

#: the skip reason of a metric that cannot run on a dispatched (device_map) model
DISPATCH_SKIP = ("does not run on a model spread over devices or offloaded (device_map): it reads parameters or "
                 "their gradients, which offloaded modules do not hold. Run it without --device-map on a device the "
                 "model fits, or plan it first (tensorscope plan) with another --memory-budget")


class MetricFailed(TensorScopeError):
    """Raised with ``fail_fast=True`` at the first metric that fails."""


class OutOfMemoryAtFloor(TensorScopeError):
    pass


class ArtifactFailed(Exception):
    """An artifact's producer raised while deriving it: only the metrics that read it fail."""

    def __init__(self, name: str, cause: BaseException) -> None:
        self.name, self.cause = name, cause
        super().__init__(f"artifact '{name}' failed: {type(cause).__name__}: {cause}")


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


@contextmanager
def time_limit(seconds: float | None, what: str, limit: float | None = None) -> Iterator[None]:
    """Interrupt the block after ``seconds`` (SIGALRM; main thread on POSIX only).

    ``limit`` is the configured limit the error names (``seconds`` may be what is left of it).
    """
    usable = seconds is not None and hasattr(signal, "setitimer") and \
        threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return
    assert seconds is not None

    def on_alarm(signum: int, frame: Any) -> None:
        raise MetricTimeoutError(f"{what} exceeded its time limit of {limit if limit is not None else seconds:g} s",
                                 "raise RunConfig(metric_timeout_s=...) or give it less data")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def to_values(metric: str, model: str, output: Mapping[str, Any],
              tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Turn what finalize returned into typed values; tensors go to the tensor store."""
    values: dict[str, Any] = {}
    for name, value in output.items():
        if isinstance(value, torch.Tensor) and value.numel() != 1:  # empty ones too: a selection may be empty
            key = f"{model}::{metric}::{name}"
            tensors[key] = value.detach().cpu()
            values[name] = TensorValue(key=key, shape=list(value.shape), dtype=str(value.dtype).removeprefix("torch."))
        elif isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1):
            number = float(value)
            values[name] = ScalarValue(value=number if math.isfinite(number) else None)
        elif isinstance(value, (list, tuple)):
            values[name] = SeriesValue(values=[float(v) for v in value])
        else:
            values[name] = value
    return values


def needed_tensors(results: Iterable[MetricResult], store: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The arrays behind the ``TensorValue`` fields of ``results``, by key: what a metric that
    needs those results gets as ``dep_tensors`` (read with ``Metric.tensor_of``)."""
    return {v.key: store[v.key] for r in results for v in r.values.values()
            if isinstance(v, TensorValue) and v.key in store}


@dataclass
class ActiveMetric:
    node: MetricNode
    instance: Any
    declared: int
    seconds: float = 0.0
    measured: int = 0
    #: the whole-model passes the metric declared for itself (kind -> count)
    own_passes: dict[str, int] = field(default_factory=dict)


#: what a metric (or a plugin's artifact) may raise that ends only its own results: any error, and
#: SystemExit too (a plugin calling sys.exit must not end the whole run without a word)
METRIC_FAULTS: tuple[type[BaseException], ...] = (Exception, SystemExit)


def metric_result(node: MetricNode, status: str, **kw: Any) -> MetricResult:
    """``node``'s result with its provenance (version, plugin, parameters, class, derivations, rung)."""
    return MetricResult(metric=node.name, version=node.cls.version, plugin=node.plugin, status=status,
                        params=node.params.model_dump(mode="json"), class_path=node.cls.class_path(),
                        derived_from=list(node.cls.derived_from), rung=node.rung, **kw)


@dataclass(kw_only=True)
class Executor:
    """What running a metric means, per model or over a model set: the cache, the time limit,
    fail_fast, error isolation, declared and measured bytes, and the result's provenance."""

    registry: Registry
    config: RunConfig
    cache: ResultCache | None
    #: counts every call of the run's models, attributed to the metric or artifact that made it
    counter: PassCounter
    results: dict[str, MetricResult] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    #: ``progress(run, steps, doing)``: each batch of a shared pass is a step, and so is each metric's
    #: result; ``doing`` names the metric whose finalize starts (steps 0), so long ones show
    progress: Callable[[str, int, str], Any] | None = None
    #: metric results reported to ``progress`` so far
    reported: int = 0

    def _tick(self, steps: int, doing: str = "") -> None:
        if self.progress is not None and (steps or doing):
            self.progress(self.where, steps, doing)

    def _report_rest(self, scope: str, nodes: Sequence[MetricNode]) -> None:
        """One step for each metric of ``scope`` not finalized here (cached, skipped or failed early)."""
        self._tick(sum(n.cls.scope == scope for n in nodes) - self.reported)

    @property
    def where(self) -> str:
        """The run the results belong to, as tensor keys name it: a model's name, or ``*``."""
        raise NotImplementedError

    @property
    def label(self) -> str:
        """The run as messages name it."""
        return self.where

    def _result(self, node: MetricNode, status: str, **kw: Any) -> MetricResult:
        return metric_result(node, status, **kw)

    def _fail(self, active: ActiveMetric, exc: BaseException) -> None:
        if isinstance(exc, NotApplicable):  # the metric found it does not apply: skipped, not failed
            self.results[active.node.name] = self._result(
                active.node, "skipped", reason=f"{exc.problem}: {exc.fix}" if exc.fix else exc.problem,
                seconds=round(active.seconds, 4), **self._passes_of(active))
            return
        if self.config.fail_fast:
            raise MetricFailed(f"{active.node.name} failed on {self.label}: {type(exc).__name__}: {exc}",
                               "fix the cause, or run without fail_fast to keep the other metrics' results") from exc
        self.results[active.node.name] = self._result(
            active.node, "error", reason=f"{type(exc).__name__}: {exc}", error_type=type(exc).__name__,
            declared_bytes=active.declared, measured_bytes=active.measured, seconds=round(active.seconds, 4),
            **self._passes_of(active))

    def _passes_of(self, active: ActiveMetric) -> dict[str, Any]:
        return {"passes_declared": dict(active.own_passes), "model_calls": self.counter.calls[active.node.name]}

    def _call(self, active: ActiveMetric, fn: Callable[[], Any]) -> Any:
        """Run one metric call under its remaining time budget, timing it."""
        limit = self.config.metric_timeout_s
        remaining = None if limit is None else max(limit - active.seconds, 1e-3)
        start = time.perf_counter()
        try:
            with time_limit(remaining, f"{active.node.name} on {self.label}", limit), \
                    self.counter.attributed(active.node.name):
                return fn()
        finally:
            active.seconds += time.perf_counter() - start

    def _cached(self, node: MetricNode) -> bool:
        """Take the metric's result from the cache when it holds one for this key."""
        if self.cache is None:
            return False
        hit = self.cache.get(self.keys[node.name])
        if hit is None:
            return False
        result, tensors = hit
        self.results[node.name] = result.model_copy(update={"from_cache": True})
        self.tensors.update(tensors)
        return True

    def _not_planned(self, node: MetricNode) -> bool:
        """Record the result of a node the plan does not run: unavailable (an error naming what is
        missing) or left out for memory (skipped, with the reason and the fix)."""
        if node.unavailable:
            self.results[node.name] = self._result(node, "error", reason=node.unavailable, error_type="Unavailable")
        elif node.over_budget:
            self.results[node.name] = self._result(node, "skipped", reason=node.over_budget)
        return not node.planned

    def _dependency_failed(self, node: MetricNode, results: Mapping[str, Mapping[str, MetricResult]]) -> bool:
        """A needed metric that did not end ok (on any model in ``results``) skips this one."""
        for model, metrics in results.items():
            for dep in node.needs:
                if dep in metrics and not metrics[dep].ok:
                    cause = metrics[dep]
                    on = f" on {model}" if model != self.where else ""
                    self.results[node.name] = self._result(
                        node, "skipped", reason=f"dependency '{dep}' {cause.status}{on}: {cause.reason}")
                    return True
        return False

    def _finish_one(self, active: ActiveMetric, compute: Callable[[], Any]) -> None:
        """Compute the output, type it, record it ok (and cache it), or record the failure. The
        instance is dropped afterwards, so its state (and any scratch file it owns) goes now."""
        self._tick(0, active.node.name)
        try:
            output = self._call(active, compute)
            active.measured = max(active.measured, active.instance.state_bytes())
            tensors: dict[str, torch.Tensor] = {}
            values = to_values(active.node.name, self.where, output, tensors)
        except METRIC_FAULTS as exc:
            self._fail(active, exc)
            return
        finally:
            active.instance = None
            self.reported += 1
            self._tick(1)
        try:
            result = self._result(active.node, "ok", values=values, declared_bytes=active.declared,
                                  measured_bytes=active.measured, seconds=round(active.seconds, 4),
                                  **self._passes_of(active))
        except ValidationError as exc:  # a value no result field takes ends this metric only
            self._fail(active, PluginError(f"{active.node.name} returned values the result schema does not take: "
                                           f"{exc}", f"return numbers, tensors or result values (report it to "
                                           f"{active.node.plugin})"))
            return
        self.results[active.node.name] = result
        self.tensors.update(tensors)
        if self.cache is not None:
            self.cache.put(self.keys[active.node.name], result, tensors, model=self.where)


@dataclass(kw_only=True)
class ModelRunner(Executor):
    """Runs the per-model metrics of one model against its plan."""

    view: ModelView
    data: PreparedData | None
    nodes: Sequence[MetricNode]
    plan: ModelPlan
    shape: RunShape
    data_fingerprint: str | None
    model_fingerprint: str
    passes: dict[str, int] = field(default_factory=dict)
    #: per artifact: the most bytes one batch of it held, and what its declaration said for that batch
    artifact_bytes: dict[str, int] = field(default_factory=dict)
    artifact_declared: dict[str, int] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return self.view.name

    def _key(self, node: MetricNode) -> str:
        return cache_key(model=self.model_fingerprint, data=self.data_fingerprint, metric=node.name,
                         version=node.cls.version, params=node.params.model_dump(mode="json"),
                         config=self.config.numeric_key(),
                         deps=sorted(self.keys.get(d, "") for d in node.needs))

    # -- the run ----------------------------------------------------------------------
    def run(self) -> None:
        with self.counter.active():
            self._run_stages()
        self._report_rest("model", self.nodes)
        for result in self.results.values():
            if result.from_cache:
                continue  # its passes ran in an earlier run
            for kind, count in result.passes_declared.items():
                self.passes[kind] = self.passes.get(kind, 0) + count

    def _run_stages(self) -> None:
        for stage in sorted({n.stage for n in self.nodes}):
            members = [n for n in self.nodes if n.stage == stage and n.cls.scope == "model"]
            active = [a for a in (self._admit(n) for n in members) if a is not None]
            if not any(set(a.node.cls.artifacts) - {"weights"} for a in active) \
                    and any(set(n.cls.artifacts) - {"weights"} for n in members):
                self._tick(self.shape.n_batches)  # the stage's data pass is not needed (results cached, skipped)
            if not active:
                continue
            weights_only = [a for a in active if not (set(a.node.cls.artifacts) - {"weights"})]
            on_data = [a for a in active if a not in weights_only]
            if weights_only:
                self.passes["weights"] = self.passes.get("weights", 0) + 1
                self._finish(weights_only)
            if on_data:
                try:
                    self._data_pass(on_data)
                except MetricFailed:
                    raise
                except METRIC_FAULTS as exc:  # the shared pass itself failed (out of memory at the floor,
                    # a model or capture error): every metric of the pass gets an error result, the run goes on
                    self.view.model.zero_grad(set_to_none=True)
                    for member in on_data:
                        if member.node.name not in self.results:
                            self._fail(member, exc)
                self._finish(on_data)

    def _admit(self, node: MetricNode) -> ActiveMetric | None:
        """Cache hit, unavailable, dependency failed, not applicable -> a result now; else run it."""
        self.keys[node.name] = self._key(node)
        if self._not_planned(node):
            return None
        if self._dependency_failed(node, {self.where: self.results}) or self._cached(node):
            return None
        cls = node.model_cls
        reason = cls.skip_reason(node.params, self.view, self.data)
        if reason is None and self.data is None and set(node.cls.artifacts) - {"weights"}:
            reason = "this run has no data"
        on_loss = bool({"token_loss", "batches"} & {a.name for a in closure(node.cls.artifacts, self.registry)})
        if reason is None and on_loss and not self.view.causal and self.view.mask_token_id is None:
            reason = "a masked-LM loss needs the tokenizer's mask token: save the tokenizer with the model"
        if reason is None and on_loss and self.view.causal and self.data is not None \
                and not any(len(s) > 1 for s in self.data.used_sequences()):
            reason = ("every sequence is one token long, so a causal loss has no next token to predict: "
                      "pass sequences of two tokens or more")
        if reason is None and self.view.device_map is not None and not cls.supports_dispatch:
            reason = DISPATCH_SKIP
        if reason is not None:
            self.results[node.name] = self._result(node, "skipped", reason=reason)
            return None
        deps = {d: self.results[d] for d in node.needs}
        declared = self.plan.declared_state.get(node.name, 0)
        active = ActiveMetric(node, None, declared)
        try:
            shape = self.shape.with_dependencies(dependency_params(node, self.nodes))  # as the plan saw it
            active.own_passes = check_declared(cls.own_passes(node.params, self.view, shape), node.name)
            tensors = needed_tensors(deps.values(), self.tensors)
            active.instance = self._call(active, lambda: cls(node.params, shape, self.view, deps, tensors))
        except METRIC_FAULTS as exc:
            self._fail(active, exc)
            return None
        return active

    def _finish(self, group: list[ActiveMetric]) -> None:
        """Finalize one metric at a time in the plan's order (``finalize_order``), each instance freed after."""
        order = {m: i for p in self.plan.passes for i, m in enumerate(p.metrics)}
        for active in sorted(group, key=lambda a: order.get(a.node.name, len(order))):
            if active.node.name in self.results:
                continue  # failed during the pass
            self._finish_one(active, active.instance.finalize)
            del active.instance
            trim()  # its state and working memory back to the system before the next finalize

    # -- the shared data pass ---------------------------------------------------------
    def _data_pass(self, group: list[ActiveMetric]) -> None:
        assert self.data is not None
        # Capture what the metrics that actually run need: members of the planned pass that were
        # cached, skipped or failed need nothing (a resumed run must not redo their backward).
        specs = closure(sorted({n for a in group for n in a.node.cls.artifacts} - {"weights"}), self.registry)
        kind = pass_kind(specs)
        backward = kind == "forward+backward"
        micro = self.plan.micro_batch
        model = self.view.model
        model.zero_grad(set_to_none=True)
        requests = merged_requests(specs, [a.node for a in group], self.view)
        with capture_scope(self.view, specs, self.config.seed, requests) as ctx:
            for batch in self.data.batches():
                batch = batch.to(self.config.device)
                targets = loss_targets(self.view, batch, self.config.seed)
                while True:
                    try:
                        artifacts = self._run_batch(ctx, specs, batch, targets, micro, backward) \
                            if kind != "data" else {s.name: None for s in specs}
                        break
                    except ArtifactFailed as failed:  # its readers fail; the batch runs again without it
                        model.zero_grad(set_to_none=True)
                        ctx.store.clear()
                        specs = self._drop_artifact(group, specs, failed)
                    except Exception as exc:
                        model.zero_grad(set_to_none=True)
                        ctx.store.clear()
                        if not is_oom(exc):
                            raise
                        if micro <= self.config.min_micro_batch:
                            raise OutOfMemoryAtFloor(
                                f"out of memory at micro-batch {micro} on {self.view.name}",
                                "lower batch_size or max_length, or use a device with more memory") from exc
                        micro = max(self.config.min_micro_batch, micro // 2)
                shared = "data" if kind == "data" else "forward"
                self.passes[shared] = self.passes.get(shared, 0) + 1
                if backward:
                    self.passes["backward"] = self.passes.get("backward", 0) + 1
                self._count_bytes(artifacts, batch, requests)
                self._feed(group, Step(batch, artifacts, targets))
                del artifacts
                model.zero_grad(set_to_none=True)  # param_grad handed metrics the .grad tensors themselves
                self._tick(1)
        model.zero_grad(set_to_none=True)

    def _count_bytes(self, artifacts: Mapping[str, Any], batch: Batch, requests: Mapping[str, Any]) -> None:
        """Declared and held bytes of each artifact of one batch. A method of its own so no loop variable
        keeps the last artifact (the weights' gradients, as large as the model) alive into the next batch."""
        for name, value in artifacts.items():
            self.artifact_bytes[name] = max(self.artifact_bytes.get(name, 0), tensor_bytes(value))
            self.artifact_declared[name] = max(self.artifact_declared.get(name, 0), self.registry.artifacts[
                name].bytes_for(self.view, batch.input_ids.shape[0], batch.input_ids.shape[1],
                                requests.get(name, {})))

    def _drop_artifact(self, group: list[ActiveMetric], specs: list[ArtifactSpec],
                       failed: ArtifactFailed) -> list[ArtifactSpec]:
        """Fail the metrics that read ``failed.name`` (``fail_fast`` raises) and capture the rest without it.
        An artifact derived from it fails in turn when the batch runs again, and is dropped the same way."""
        for active in group:
            if failed.name in active.node.cls.artifacts and active.node.name not in self.results:
                self._fail(active, failed.cause)
        return [s for s in specs if s.name != failed.name]

    def _feed(self, group: list[ActiveMetric], step: Step) -> None:
        """Update each live metric; drop each artifact after its last consumer."""
        live = [a for a in group if a.node.name not in self.results]
        last_use = {name: i for i, a in enumerate(live) for name in a.node.cls.artifacts}
        artifacts = dict(step.artifacts)
        for i, active in enumerate(live):
            view = Step(step.batch, {k: artifacts[k] for k in active.node.cls.artifacts if k in artifacts},
                        step.targets)
            try:
                self._call(active, functools.partial(active.instance.update, view))
                active.measured = max(active.measured, active.instance.state_bytes())
            except METRIC_FAULTS as exc:
                self._fail(active, exc)
            for name in [n for n, last in last_use.items() if last == i]:
                artifacts.pop(name, None)

    def _run_batch(self, ctx: CaptureContext, specs: list[ArtifactSpec], batch: Batch, targets: LossTargets,
                   micro: int, backward: bool) -> dict[str, Any]:
        model = self.view.model
        kwargs = {k: v for s in specs for k, v in s.forward_kwargs}
        forward_specs = [s for s in specs if s.pass_kind == "forward"]
        summed = [s for s in specs if s.pass_kind == "backward" and s.combine == "sum"]
        per_micro_backward = [s for s in specs if s.pass_kind == "backward" and s.combine == "cat"]
        parts: dict[str, list[Any]] = {}
        ctx.batch_tokens = max(targets.n_targets, 1)
        ctx.grad_enabled = backward
        ctx.loaded_grads.clear()  # also what a try that ran out of memory had summed
        ctx.batch_sums.clear()
        into_weights = any(s.name == PARAM_GRAD for s in specs)
        for start in range(0, batch.input_ids.shape[0], micro):
            sub, sub_targets = batch.slice(start, start + micro), targets.slice(start, start + micro)
            ctx.store.clear()
            ctx.batch, ctx.targets = sub, sub_targets
            with torch.set_grad_enabled(backward), embedding_output(self.view) as embedded:
                with self.counter.attributed("shared"):
                    ctx.outputs = model(input_ids=sub_targets.model_input, attention_mask=sub.attention_mask,
                                        use_cache=False, **kwargs)
                for spec in forward_specs:
                    self._derive(spec, ctx, sub)
                if backward:
                    backpropagate(ctx.store["token_loss"].sum() / ctx.batch_tokens, embedded, into_weights)
            for spec in per_micro_backward:
                self._derive(spec, ctx, sub)
            ctx.outputs = None
            for name in ctx.wanted:
                if name in ctx.store and name not in {s.name for s in summed}:
                    parts.setdefault(name, []).append(detach_all(ctx.store[name]))
        for spec in summed:
            self._derive(spec, ctx, batch)
            parts[spec.name] = [ctx.store[spec.name]]
        ctx.store.clear()
        ctx.batch_sums.clear()  # the batch's artifacts hold their sums; none outlives them
        return {name: combine_micro(values) for name, values in parts.items()}

    def _derive(self, spec: ArtifactSpec, ctx: CaptureContext, batch: Batch) -> None:
        """Fill one artifact for ``batch`` (a micro-batch, or the whole batch for summed ones),
        counting the passes its producer makes itself."""
        if spec.derive is None:
            return
        if spec.own_passes is not None:
            own = check_declared(spec.own_passes(self.view, batch.input_ids.shape[0], batch.input_ids.shape[1],
                                                 ctx.request(spec.name)), f"artifact '{spec.name}'")
            for kind, count in own.items():
                self.passes[kind] = self.passes.get(kind, 0) + count
        with self.counter.attributed(f"artifact:{spec.name}"):
            try:
                spec.derive(ctx)
            except METRIC_FAULTS as exc:
                if is_oom(exc):
                    raise  # the pass halves its micro-batch
                raise ArtifactFailed(spec.name, exc) from exc
