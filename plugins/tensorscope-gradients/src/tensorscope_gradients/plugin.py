"""Entry point of the plugin: registers the per_sample_grad artifact and the metrics with the core."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tensorscope_core import hookimpl

from .flow import GradientFlow
from .pathology import GradientPathology
from .per_sample import PER_SAMPLE_GRAD
from .sample_conflicts import SampleConflicts
from .task_conflict import TaskConflict
from .tracin import CriticalSamples, TracIn, TracInTerms

TENSORSCOPE_PLUGIN_API = 1

METRICS = (GradientFlow, GradientPathology, TaskConflict, SampleConflicts, TracInTerms, TracIn, CriticalSamples)


@hookimpl
def register_metrics(register: Callable[[type], None]) -> None:
    for metric in METRICS:
        register(metric)


@hookimpl
def register_artifacts(register: Callable[[Any], None]) -> None:
    register(PER_SAMPLE_GRAD)
