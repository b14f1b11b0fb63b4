"""Helpers shared by the core tests (imported as a plain module: tests/ is on sys.path)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from tensorscope_core import plugins as ts_plugins
from tensorscope_core.models.load import ModelSource, load_model
from tensorscope_core.models.view import ModelView

FAMILIES = ("gpt2", "llama", "neox", "bert")
BASIC = ("basic.loss", "basic.activation_stats", "basic.grad_norms", "basic.weight_norms")
#: Only the core and the reference plugin: core tests do not depend on which other
#: first-party plugins happen to be installed (and stay fast).
ONLY_BASIC = "basic"


def view_of(source: Any, registry: ts_plugins.Registry, **kw: Any) -> ModelView:
    src = source if isinstance(source, ModelSource) else ModelSource(source)
    return load_model(src, registry.adapters, **kw)


def count_hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in module.modules())


def values_of(result: Any) -> dict[str, Any]:
    """A metric result's values as plain JSON-able data (no timings)."""
    return {k: v.model_dump(mode="json") for k, v in result.values.items()}


def flat(values: Iterable[Any]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float64)


def synthetic_record(models: dict[str, dict[str, dict[str, Any]]], *, data: str | dict[str, str] = "data-0",
                     failed: dict[str, dict[str, str]] | None = None, seed: int = 0,
                     derived_from: dict[str, list[str]] | None = None) -> Any:
    """A RunRecord without running anything: ``{model: {metric: {field: Value}}}``; ``failed``
    adds ``{model: {metric: reason}}`` error results; ``data`` is one data fingerprint or one per model;
    ``derived_from`` records ``{metric: sources}`` in the results, as the core does."""
    from tensorscope_core.results.schema import MetricResult, ModelRecord, RunRecord

    records = []
    for i, (name, metrics) in enumerate(models.items()):
        results = {m: MetricResult(metric=m, version="1", plugin=f"plugin-{m.split('.')[0]}", status="ok",
                                   values=values, derived_from=(derived_from or {}).get(m, []))
                   for m, values in metrics.items()}
        for m, reason in (failed or {}).get(name, {}).items():
            results[m] = MetricResult(metric=m, version="1", plugin=f"plugin-{m.split('.')[0]}", status="error",
                                      reason=reason, error_type="RuntimeError")
        records.append(ModelRecord(name=name, family="gpt2", fingerprint=f"fingerprint-{i}",
                                   dims={"n_layers": 2, "d_model": 8, "n_heads": 2},
                                   data_fingerprint=data if isinstance(data, str) else data[name],
                                   metrics=results))
    return RunRecord(tensorscope_version="test", config={"seed": seed}, device="cpu", dtype="float32",
                     models=records)


def whole_and_micro_batched(folder: Any, data: Any, metrics: list[str], config: Any) -> tuple[Any, Any]:
    """The run as configured and in its smallest micro-batches, checked to have made more per-example calls:
    what a test of joining micro-batches compares."""
    from tensorscope_core import analyze
    from tensorscope_core.testing import smallest_micro_batch

    whole = analyze(folder, data=data, metrics=metrics, config=config)
    micro = analyze(folder, data=data, metrics=metrics, config=smallest_micro_batch(folder, data, metrics, config))
    calls = "artifact:per_example_grads"
    assert micro.record.models[0].model_calls[calls] > whole.record.models[0].model_calls[calls]
    return whole, micro
