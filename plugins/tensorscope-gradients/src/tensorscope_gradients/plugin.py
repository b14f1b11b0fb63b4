"""Entry point of the plugin: registers the metrics with the core (their per-example gradients come
from the core's ``per_example_grads`` artifact)."""

from __future__ import annotations

from collections.abc import Callable

from tensorscope_core.plugin_api import hookimpl

from .flow import GradientFlow
from .layer_alignment import LayerAlignment
from .pathology import GradientPathology
from .sample_conflicts import SampleConflicts
from .task_conflict import TaskConflict
from .tracin import CriticalSamples, TracIn, TracInTerms

TENSORSCOPE_PLUGIN_API = 2

METRICS = (GradientFlow, GradientPathology, TaskConflict, LayerAlignment, SampleConflicts, TracInTerms, TracIn,
           CriticalSamples)


@hookimpl
def register_metrics(register: Callable[[type], None]) -> None:
    for metric in METRICS:
        register(metric)
