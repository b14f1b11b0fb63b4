"""pluggy hook specifications: how a plugin adds metrics, artifacts, adapters and report sections.

Each hook receives a ``register`` callback (the llm / tox pattern), so a plugin
registers as many things as it likes and the core validates each as it arrives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "tensorscope"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: Bumped when a hook's contract changes incompatibly. A plugin module declares the
#: version it was written for as ``TENSORSCOPE_PLUGIN_API``; a mismatch marks it broken.
PLUGIN_API_VERSION = 2


@hookspec
def register_metrics(register: Callable[[type], None]) -> None:
    """Register Metric subclasses: ``register(MyMetric)``."""


@hookspec
def register_artifacts(register: Callable[[Any], None]) -> None:
    """Register ArtifactSpec instances that metrics can ask for by name."""


@hookspec
def register_adapters(register: Callable[[Any], None]) -> None:
    """Register model adapters (objects with ``name``, ``matches(model)``, ``build(...)``)."""


@hookspec
def register_report_sections(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """Register report sections: ``register(title, render)``; ``render(results)`` returns HTML
    (escape what you insert; draw with ``tensorscope_core.report.plots``), or None / "" to
    leave the section out of that report. A render that raises shows its error in the report."""
