"""Entry point of the plugin: registers its metrics and its report section with the core."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tensorscope_core.plugin_api import hookimpl

from .drift import RepresentationDrift
from .fragility import Fragility
from .grokking import Grokking
from .phase_transitions import PhaseTransitions
from .plasticity import Plasticity
from .report import dynamics_section
from .signal_propagation import SignalPropagation
from .task_accuracy import TaskAccuracy

TENSORSCOPE_PLUGIN_API = 2

METRICS: tuple[type, ...] = (
    PhaseTransitions,
    TaskAccuracy,
    Grokking,
    Plasticity,
    SignalPropagation,
    Fragility,
    RepresentationDrift,
)


@hookimpl
def register_metrics(register: Callable[[type], None]) -> None:
    for metric in METRICS:
        register(metric)


@hookimpl
def register_report_sections(register: Callable[[str, Callable[[Any], str | None]], None]) -> None:
    register("Training dynamics", dynamics_section)
