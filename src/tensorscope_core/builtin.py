"""The core's own plugin: first-party adapters and core artifacts, registered like any other."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .core_artifacts import CORE_ARTIFACTS
from .example_grads import PER_EXAMPLE_GRADS
from .hookspecs import hookimpl
from .models.adapters import BUILTIN_ADAPTERS

TENSORSCOPE_PLUGIN_API = 2


@hookimpl
def register_artifacts(register: Callable[[Any], None]) -> None:
    for spec in (*CORE_ARTIFACTS, PER_EXAMPLE_GRADS):
        register(spec)


@hookimpl
def register_adapters(register: Callable[[Any], None]) -> None:
    for adapter in BUILTIN_ADAPTERS:
        register(adapter)
