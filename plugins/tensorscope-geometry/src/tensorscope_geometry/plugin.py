"""Entry point of the plugin: registers its metrics with the core."""

from __future__ import annotations

from collections.abc import Callable

from tensorscope_core import hookimpl

TENSORSCOPE_PLUGIN_API = 1

METRICS: tuple[type, ...] = (
)


@hookimpl
def register_metrics(register: Callable[[type], None]) -> None:
    for metric in METRICS:
        register(metric)
