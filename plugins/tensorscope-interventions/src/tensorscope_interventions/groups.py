"""Parameters grouped by transformer block (and everything outside the blocks), for per-layer fields."""

from __future__ import annotations

import math
from collections.abc import Mapping

from tensorscope_core.plugin_api import LayerValue, ModelView

OUTSIDE = "outside"  # the embeddings, the final norm and the head


def group_labels(view: ModelView) -> list[str]:
    """``"0" .. str(n_layers - 1)`` and ``"outside"``."""
    return [str(layer) for layer in range(view.n_layers)] + [OUTSIDE]


def group_of(view: ModelView) -> dict[str, int]:
    """Parameter name -> group index: its block, or ``n_layers`` for parameters outside every block."""
    return {name: view.n_layers if layer is None else layer for name, layer in view.layer_of_parameter().items()}


def group_spans(view: ModelView, layout: Mapping[str, tuple[slice, tuple[int, ...]]]) -> list[list[slice]]:
    """Per group, the slices of the flat vector (``layout``: name -> (slice, shape)) its parameters
    take, adjacent slices merged."""
    owner = group_of(view)
    spans: list[list[slice]] = [[] for _ in range(view.n_layers + 1)]
    for name, (span, _) in layout.items():
        mine = spans[owner[name]]
        if mine and mine[-1].stop == span.start:
            mine[-1] = slice(mine[-1].start, span.stop)
        else:
            mine.append(span)
    return spans


def number(value: float) -> float | None:
    """NaN and infinities become None (null in results.json)."""
    value = float(value)
    return value if math.isfinite(value) else None


def layer_value(view: ModelView, values: list[float]) -> LayerValue:
    """One entry per block and one for the parameters outside the blocks (axis ``labelled``)."""
    return LayerValue(values=[number(v) for v in values], labels=group_labels(view), axis="labelled")
