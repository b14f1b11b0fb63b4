"""Entry point of the plugin: registers its metrics, its artifact and its report section with the core."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tensorscope_core.plugin_api import hookimpl

from .block_parts import BLOCK_PARTS
from .mdl import MDL
from .mutual_information import MutualInformation
from .pid import PID
from .report import TITLE, information_section

TENSORSCOPE_PLUGIN_API = 2

METRICS: tuple[type, ...] = (MutualInformation, PID, MDL)


@hookimpl
def register_metrics(register: Callable[[type], None]) -> None:
    for metric in METRICS:
        register(metric)


@hookimpl
def register_artifacts(register: Callable[[Any], None]) -> None:
    register(BLOCK_PARTS)


@hookimpl
def register_report_sections(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register(TITLE, information_section)
