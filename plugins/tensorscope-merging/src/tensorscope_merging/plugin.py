"""Entry point of the plugin: registers its metrics with the core."""

from __future__ import annotations

from collections.abc import Callable

from tensorscope_core.plugin_api import hookimpl

from .fisher_weighted import FisherWeighted
from .imp import ImpOverlap, IterativeMagnitudePruning
from .landscape import LossSurface2D
from .lottery import EarlyBird, MagnitudeMasks
from .mode_connectivity import ModeConnectivity
from .sharpness import Sharpness
from .task_vectors import TaskVectors
from .ties_conflicts import TiesConflicts

TENSORSCOPE_PLUGIN_API = 2

METRICS: tuple[type, ...] = (
    TaskVectors, TiesConflicts, FisherWeighted, ModeConnectivity,
    LossSurface2D, Sharpness, MagnitudeMasks, EarlyBird, IterativeMagnitudePruning, ImpOverlap,
)


@hookimpl
def register_metrics(register: Callable[[type], None]) -> None:
    for metric in METRICS:
        register(metric)
