"""Parameters of a model set as plain tensors: members, task vectors, per-layer groups."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from tensorscope_core.plugin_api import LayerValue, ModelView, float64_sum_of_squares

OUTSIDE = "outside"  # label of the parameters outside every block (embeddings, final norm, head)


def number(value: float) -> float | None:
    """A value for the results: NaN and infinities become None (written as null)."""
    value = float(value)
    return value if math.isfinite(value) else None


def parameters(view: ModelView) -> dict[str, torch.Tensor]:
    """Trainable parameters by name, detached (a tied pair appears once, as in ``named_parameters``)."""
    return {name: p.detach() for name, p in view.model.named_parameters()}


def members(views: Mapping[str, ModelView], base_name: str | None) -> list[str]:
    """The models other than the base, in the order given."""
    return [name for name in views if name != base_name]


def check_compatible(views: Mapping[str, ModelView]) -> None:
    """Every member has the same parameter names and shapes (merging is entrywise)."""
    names = list(views)
    ref = {k: tuple(v.shape) for k, v in parameters(views[names[0]]).items()}
    for other in names[1:]:
        got = {k: tuple(v.shape) for k, v in parameters(views[other]).items()}
        if got != ref:
            diff = sorted(set(ref.items()) ^ set(got.items()))[:3]
            raise ValueError(f"{other} and {names[0]} do not share one architecture (first differences: {diff}); "
                             "merging needs fine-tunes of the same base model")


@dataclass(frozen=True)
class Groups:
    """Parameter name -> group: block index, or ``n_layers`` for everything outside the blocks."""

    of: dict[str, int]
    n_layers: int

    @classmethod
    def of_view(cls, view: ModelView) -> Groups:
        layer_of = view.layer_of_parameter()
        return cls({name: view.n_layers if layer is None else layer for name, layer in layer_of.items()},
                   view.n_layers)

    @property
    def labels(self) -> list[str]:
        return [str(layer) for layer in range(self.n_layers)] + [OUTSIDE]

    def label(self, group: int) -> str:
        return self.labels[group]

    def layer_value(self, values: torch.Tensor | list[float]) -> LayerValue:
        """One entry per block plus the last, ``outside`` (n_layers + 1 named entries: axis ``labelled``)."""
        return LayerValue(values=[number(v) for v in values], labels=self.labels, axis="labelled")

    def sum_squares(self, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> torch.Tensor:
        """Sum of squared entries per group, float64 [n_layers + 1]. ``tensors``: by name, or
        (name, tensor) pairs, e.g. a generator that computes each tensor only when its turn comes,
        so no model-sized dict of them is ever held."""
        out = torch.zeros(self.n_layers + 1, dtype=torch.float64)
        for name, t in tensors.items() if isinstance(tensors, Mapping) else tensors:
            out[self.of[name]] += float64_sum_of_squares(t).cpu()
        return out
