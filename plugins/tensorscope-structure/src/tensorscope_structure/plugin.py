"""Entry point of the plugin: registers its metrics and its report section with the core."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tensorscope_core.plugin_api import hookimpl

from .modularity import StructureModularity
from .report import TITLE, structure_section
from .separability import StructureSeparability

TENSORSCOPE_PLUGIN_API = 2

METRICS: tuple[type, ...] = (StructureModularity, StructureSeparability)


@hookimpl
def register_metrics(register: Callable[[type], None]) -> None:
    for metric in METRICS:
        register(metric)


@hookimpl
def register_report_sections(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register(TITLE, structure_section)
