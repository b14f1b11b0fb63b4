"""Entry point of the plugin: registers its metrics and its report section with the core."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tensorscope_core.plugin_api import hookimpl

from .null_space import NullSpace
from .report import TITLE, interventions_section
from .steering import Steering
from .vectors import InterventionVectors

TENSORSCOPE_PLUGIN_API = 2

METRICS: tuple[type, ...] = (InterventionVectors, Steering, NullSpace)


@hookimpl
def register_metrics(register: Callable[[type], None]) -> None:
    for metric in METRICS:
        register(metric)


@hookimpl
def register_report_sections(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register(TITLE, interventions_section)
