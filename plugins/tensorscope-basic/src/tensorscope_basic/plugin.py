"""Entry point of the plugin: registers its metrics with the core."""

from __future__ import annotations

from collections.abc import Callable

from tensorscope_core.plugin_api import hookimpl

from .activations import ActivationStats
from .gradients import GradNorms
from .loss import Loss
from .weights import WeightNorms

TENSORSCOPE_PLUGIN_API = 2


@hookimpl
def register_metrics(register: Callable[[type], None]) -> None:
    for metric in (Loss, ActivationStats, GradNorms, WeightNorms):
        register(metric)
