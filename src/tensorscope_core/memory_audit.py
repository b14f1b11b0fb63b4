"""What a run held against what its plan declared, metric by metric.

A plan is only as good as the costs it adds up: a metric that declares 1 GiB and holds 3 kills a run
the plan said would fit. The audit runs each metric alone on an already loaded model and compares two
pairs: the plan's declared peak above the weights against the process's peak resident memory above
what it held before the run (Linux: ``VmHWM``, reset through ``/proc/self/clear_refs``), and the
metric's declared state against the bytes its state held at the end (the runner's measurement).

Resident memory is what ends a run (the kernel kills on it), so it is the measure, not the tensors the
allocator knows of. Three steps keep it honest: freed tensors go back to the system at once (a fixed
``mmap`` threshold, as every run sets it, and ``malloc_trim`` before each run: ``process_memory``), each
metric first runs on a tiny model of the same family so the modules it imports are resident before the
measured run, and quantities under
``FLOOR_BYTES`` compare by that absolute margin (the interpreter's own growth is that size).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .config import RunConfig, format_bytes
from .data import DataSpec
from .errors import UsageError
from .process_memory import return_freed_memory, trim

#: relative agreement asked of every declared cost
TOLERANCE = 0.15
#: below this, declared and held compare by absolute difference: the interpreter's own growth in a run
FLOOR_BYTES = 48 * 2**20
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class MemoryAudit:
    """One metric run alone: declared against held, above the weights."""

    metric: str
    status: str
    declared_peak: int
    held_peak: int
    declared_state: int
    held_state: int
    #: bytes of the tensors among its results, which the run keeps to its end: declared and held
    declared_results: int = 0
    held_results: int = 0
    #: why it was skipped or failed (None when it ran)
    reason: str | None = None

    @staticmethod
    def agrees(declared: int, held: int) -> bool:
        return abs(held - declared) <= max(TOLERANCE * declared, FLOOR_BYTES)

    @property
    def ran(self) -> bool:
        """False for a metric that ended skipped: it held nothing to compare."""
        return self.status != "skipped"

    @property
    def ok(self) -> bool:
        """Ran, without error, and held what it declared (a skipped metric is not ok: it was not checked)."""
        return self.status == "ok" and self.agrees(self.declared_peak, self.held_peak) \
            and self.agrees(self.declared_state, self.held_state) \
            and self.agrees(self.declared_results, self.held_results)

    def line(self) -> str:
        mark = "ok " if self.ok else ("OFF" if self.ran else "n/a")
        pairs = {"peak": (self.declared_peak, self.held_peak), "state": (self.declared_state, self.held_state),
                 "results": (self.declared_results, self.held_results)}
        shown = "   ".join(f"{what} declared {format_bytes(d):>10} held {format_bytes(h):>10}"
                           for what, (d, h) in pairs.items())
        why = f": {self.reason}" if self.reason else ""
        return f"{mark} {self.metric:<40} {shown}   ({self.status}{why})"


def _read_status(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise UsageError(f"{_STATUS} has no {field}", "run the memory audit on Linux")


def _check_linux() -> None:
    if not sys.platform.startswith("linux") or not _CLEAR_REFS.exists():
        raise UsageError("the memory audit reads the process's peak resident memory through /proc (Linux only)",
                         "run it on a Linux machine")
    # a freed large block goes back to the system now (a run keeps glibc's default; process_memory). Set
    # before the models are built where it matters: heaps a large model left behind, freed under the
    # default, inflate what the metrics are seen to hold (bench/memory_audit.py sets it first)
    return_freed_memory()


def _settle() -> int:
    """Free what can be freed, restart the peak from now; the resident bytes now."""
    gc.collect()
    trim()
    _CLEAR_REFS.write_text("5")
    return _read_status("VmRSS")


def audit(model: nn.Module, data: DataSpec, metrics: Sequence[str], *, config: RunConfig,
          warm_up: nn.Module, warm_up_data: DataSpec,
          params: Mapping[str, Mapping[str, Any]] | None = None,
          progress: Callable[[MemoryAudit], None] | None = None) -> list[MemoryAudit]:
    """Each of ``metrics`` alone on ``model`` (loaded, in ``config``'s dtype and device): its plan's
    declared peak and state against what the run held. ``params``: settings of any metric, each given
    to the runs that compute it (a metric needed by the audited one too). ``warm_up``: a tiny model of the same family
    each metric runs on first (with ``warm_up_data``), so imports and one-time set-up are not counted."""
    def declared(plans: list[Any]) -> tuple[int, dict[str, int]]:
        return int(plans[0].peak_bytes - plans[0].weights_bytes), plans[0].declared_results

    return _audit_each(metrics, {"models": model}, {"models": warm_up}, data, warm_up_data, config, params,
                       declared, progress, set_stage=False)


def audit_set(models: Mapping[str, nn.Module], data: DataSpec, metrics: Sequence[str], *, config: RunConfig,
              warm_up: Mapping[str, nn.Module], warm_up_data: DataSpec, base: nn.Module | None = None,
              warm_up_base: nn.Module | None = None, params: Mapping[str, Mapping[str, Any]] | None = None,
              progress: Callable[[MemoryAudit], None] | None = None) -> list[MemoryAudit]:
    """Each model-set metric of ``metrics`` alone over ``models`` (and ``base``): the set stage's declared
    peak above the members' weights (its state and working memory) against the process's peak during that
    stage above what it held when the stage began (the members' per-model runs, which ``audit`` checks,
    are before it). ``warm_up`` / ``warm_up_base``: tiny models of the same shape of set, run first."""
    def declared(plans: list[Any]) -> tuple[int, dict[str, int]]:
        return int(plans[-1].stage_bytes), plans[-1].declared_results

    return _audit_each(metrics, {"models": models, "base": base}, {"models": warm_up, "base": warm_up_base}, data,
                       warm_up_data, config, params, declared, progress, set_stage=True)


def _audit_each(metrics: Sequence[str], models: Mapping[str, Any], warm_up: Mapping[str, Any], data: DataSpec,
                warm_up_data: DataSpec, config: RunConfig, params: Mapping[str, Mapping[str, Any]] | None,
                declared: Callable[[list[Any]], tuple[int, dict[str, int]]],
                progress: Callable[[MemoryAudit], None] | None, *, set_stage: bool) -> list[MemoryAudit]:
    from .api import analyze, plan
    from .plugins import get_registry
    from .scheduler.graph import resolve

    _check_linux()
    out: list[MemoryAudit] = []
    for name in metrics:
        computed = {node.name for node in resolve([name], {}, get_registry())}
        asked = {m: dict(p) for m, p in (params or {}).items() if m in computed}
        analyze(data=warm_up_data, metrics=[name], config=config, params=asked, **warm_up)
        plans = plan(data=data, metrics=[name], config=config, params=asked, **models)
        with _stage_start(set_stage) as start:
            results = analyze(data=data, metrics=[name], config=config, params=asked, **models)
        held = _read_status("VmHWM") - start[0]
        runs = results.record.model_set if set_stage else results.record.models[0].metrics
        result = runs[name]
        outputs = sum(t.numel() * t.element_size() for key, t in results.tensors.items() if f"::{name}::" in key)
        peak, kept = declared(plans)
        row = MemoryAudit(name, result.status, peak, held, result.declared_bytes or 0, result.measured_bytes or 0,
                          kept.get(name, 0), outputs, result.reason)
        out.append(row)
        if progress is not None:
            progress(row)
    return out


@contextmanager
def _stage_start(set_stage: bool) -> Iterator[list[int]]:
    """The resident bytes when the measured part begins (the peak restarts there): now, or (``set_stage``)
    when the run's model-set stage starts, after its members' own runs."""
    from .scheduler.model_set import ModelSetRunner

    start = [_settle()]
    if not set_stage:
        yield start
        return
    run = ModelSetRunner.run

    def settled_run(self: ModelSetRunner) -> Any:
        start[0] = _settle()
        return run(self)

    ModelSetRunner.run = settled_run  # type: ignore[method-assign]
    try:
        yield start
    finally:
        ModelSetRunner.run = run  # type: ignore[method-assign]


def saved_tensor_bytes(model: nn.Module, ids: Any, *, second_order: bool = False, **forward: Any) -> int:
    """Bytes autograd saves for the backward in one forward of ``model`` on ``ids``: unique storages, the
    model's own weights left out (they are counted as weights). The measure behind
    ``models.activations``' table of what each architecture's blocks keep. ``second_order``: also the
    tensors a backward of the summed cross-entropy of the logits against ``ids`` saves when made with
    ``create_graph=True`` (the first-order graph a Hessian-vector product differentiates again: the
    measure behind ``SECOND_ORDER``)."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(ids, **forward)
        if second_order:
            logits = out.logits.float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, -2), ids.flatten(), reduction="sum")
            grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], create_graph=True)
    total = sum(n for ptr, n in saved.items() if ptr not in weights)
    if second_order:
        del grads
    return total
