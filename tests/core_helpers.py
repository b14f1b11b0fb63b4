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
