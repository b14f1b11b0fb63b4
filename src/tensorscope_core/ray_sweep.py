"""The Ray executor: each member's per-model stage as one Ray task, on a laptop or a cluster.

The driver plans every member first (as the local executor does), puts each distinct prepared
dataset in the object store once, and submits one task per member with the resources its plan
declares. Workers write the shared result cache as they go, so a task Ray retries after its
worker died serves the metrics that finished from the cache. A member whose task fails on every
try ends with error results; the other members' results are kept.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from .api import SCRATCH_DIR, MemberRun, Prepared, lost_member, run_member
from .config import RunConfig, format_bytes
from .errors import MissingDependencyError, PlanDoesNotFitError, UsageError
from .example_store import scratch_under
from .machine import Budget
from .models.adapters import Adapter
from .plugins import Registry
from .quiet import quiet_transformers
from .results.store import ResultCache
from .scheduler.graph import MetricNode

RAY_EXTRA = "pip install 'tensorscope[ray]'"
#: how often Ray reruns a member whose worker process died (a raised error is not retried: it would
#: fail again the same way)
TASK_RETRIES = 3
#: seconds between reading the workers' progress while waiting for members
PROGRESS_EVERY_S = 0.5


def import_ray() -> Any:
    """The ``ray`` module, or MissingDependencyError naming the extra."""
    try:
        import ray
    except ImportError as exc:
        raise MissingDependencyError("ray", "executor='ray'", RAY_EXTRA) from exc
    return ray


def _connect(ray: Any, address: str | None) -> bool:
    """Join ``address`` (None: start a local cluster) unless this process already has; True when it did."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise UsageError(f"no Ray cluster answers at ray_address={address!r}: {exc}",
                         "start one with `ray start --head` on the head machine (and `ray start --address HEAD:6379` "
                         "on the others), or leave --ray-address out to start a local cluster") from exc
    return True


def _largest_node_memory(ray: Any) -> int:
    return max((int(n["Resources"].get("memory", 0)) for n in ray.nodes() if n.get("Alive")), default=0)


def _resources(p: Prepared, config: RunConfig, node_memory: int) -> dict[str, Any]:
    """What the member's task asks Ray for: one CPU, a GPU when the run is on CUDA, and the plan's peak."""
    if p.plan.peak_bytes > node_memory:
        raise PlanDoesNotFitError(
            f"the plan for {p.plan.model} needs {format_bytes(p.plan.peak_bytes)}, more than the largest Ray node "
            f"offers ({format_bytes(node_memory)} of 'memory' resource)",
            "add a larger node to the cluster, or set memory_budget (--memory-budget) to the workers' memory so "
            "the plan steps metrics down to fit", p.plan.render())
    return {"num_cpus": 1, "num_gpus": 1 if config.device.startswith("cuda") else 0,
            "memory": max(p.plan.peak_bytes, 1), "max_retries": TASK_RETRIES, "retry_exceptions": False}


def _member_task(p: Prepared, data: Any, nodes: Sequence[MetricNode], registry: Registry, config: RunConfig,
                 adapter: Adapter | None, tokenizer: Any, budget: Budget, sink: Any) -> MemberRun:
    """One member's per-model stage on a Ray worker, writing the shared cache as metrics finish."""
    quiet_transformers()
    p = dataclasses.replace(p, data=data)
    cache = ResultCache(Path(config.cache_dir), refresh=config.force_recompute) if config.cache_dir else None
    progress = (lambda model, n, doing: sink.add.remote(n) if n else None) if sink is not None else None  # noqa: E731
    with ExitStack() as scratch:
        if config.cache_dir:
            scratch.enter_context(scratch_under(Path(config.cache_dir) / SCRATCH_DIR))
        run, _ = run_member(p, nodes, registry, config, adapter, tokenizer, budget, cache, progress)
    return run


class _ProgressSink:
    """Counts the batches the workers report; the driver takes the count to move its bar."""

    def __init__(self) -> None:
        self.batches = 0

    def add(self, n: int) -> None:
        self.batches += n

    def take(self) -> int:
        n, self.batches = self.batches, 0
        return n


def _lost(p: Prepared, nodes: Sequence[MetricNode], exc: BaseException) -> MemberRun:
    """A member whose task failed on every try."""
    cause = getattr(exc, "cause", None) or exc
    return lost_member(p, nodes, f"the member's Ray task failed ({type(cause).__name__}: {cause})",
                       type(cause).__name__)


def run_members_on_ray(prepared: Sequence[Prepared], nodes: Sequence[MetricNode], registry: Registry,
                       config: RunConfig, adapter: Adapter | None, tokenizer: Any, budget: Budget,
                       bar: Any) -> list[MemberRun]:
    """Every member's per-model stage as a Ray task; the runs in the members' order."""
    ray = import_ray()
    started = _connect(ray, config.ray_address)
    try:
        node_memory = _largest_node_memory(ray)
        options = [_resources(p, config, node_memory) for p in prepared]
        if config.device.startswith("cuda") and not ray.cluster_resources().get("GPU"):
            raise UsageError(f"device={config.device!r} but the Ray cluster has no GPU",
                             "start the workers on GPU machines, or run with --device cpu")
        task = ray.remote(_member_task)
        sink = ray.remote(num_cpus=0)(_ProgressSink).remote() if bar is not None else None
        data_refs: dict[str, Any] = {}
        pending: dict[Any, int] = {}
        for i, (p, opts) in enumerate(zip(prepared, options, strict=True)):
            data_ref = None
            if p.data is not None:  # members with the same tokenised data share one object
                key = p.data.fingerprint()
                if key not in data_refs:
                    data_refs[key] = ray.put(p.data)
                data_ref = data_refs[key]
            shipped = dataclasses.replace(p, view=None, data=None)
            ref = task.options(**opts).remote(shipped, data_ref, list(nodes), registry, config, adapter, tokenizer,
                                              budget, sink)
            pending[ref] = i
        return _gather(ray, pending, prepared, nodes, config, bar, sink)
    finally:
        if started:
            ray.shutdown()


def _gather(ray: Any, pending: dict[Any, int], prepared: Sequence[Prepared], nodes: Sequence[MetricNode],
            config: RunConfig, bar: Any, sink: Any) -> list[MemberRun]:
    """Wait for every member, moving the bar with the workers' progress; a lost member gets error results
    (with fail_fast, its error is raised)."""
    runs: list[MemberRun | None] = [None] * len(prepared)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=PROGRESS_EVERY_S if sink is not None else None)
        if sink is not None:
            bar.update(ray.get(sink.take.remote()))
        for ref in done:
            i = pending.pop(ref)
            try:
                runs[i] = ray.get(ref)
            except ray.exceptions.RayError as exc:
                if config.fail_fast:
                    cause = getattr(exc, "cause", None)
                    raise (cause if isinstance(cause, Exception) else exc) from exc
                runs[i] = _lost(prepared[i], nodes, exc)
            if bar is not None:
                bar.set_postfix(members=f"{sum(r is not None for r in runs)}/{len(runs)}")
    return [r for r in runs if r is not None]
