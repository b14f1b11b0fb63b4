"""Parameter subsets and the flat layout every gradient metric of this plugin uses.

A gradient is flattened by concatenating its parameter tensors in ``named_parameters``
order (tied parameters once, under their first name). ``Layout`` records where each
parameter lies in that vector and which block (``view.blocks[l]``) owns it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from pydantic import Field

from tensorscope_core import ModelView, Params


class SubsetParams(Params):
    """Parameters shared by the metrics that can work on a subset of the model's parameters."""

    parameters: list[str] | None = Field(
        None, description="glob patterns (fnmatch) of parameter names to use, e.g. ['lm_head.*']; "
                          "None: no restriction by name")
    layers: list[int] | None = Field(
        None, description="block indices whose parameters to use; None: no restriction by block")


@dataclass(frozen=True)
class Layout:
    """Where each parameter lies in a flat gradient vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    layers: tuple[int | None, ...]

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        out = [0]
        for shape in self.shapes:
            out.append(out[-1] + int(torch.Size(shape).numel()))
        return tuple(out)

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def span(self, name: str) -> tuple[int, int]:
        i = self.names.index(name)
        return self.offsets[i], self.offsets[i + 1]

    def columns(self, names: Sequence[str]) -> torch.Tensor | None:
        """Indices of ``names``' entries in this layout's vectors (None: all of them, in order)."""
        if tuple(names) == self.names:
            return None
        return torch.cat([torch.arange(*self.span(n)) for n in names]) if names else torch.zeros(0, dtype=torch.long)

    def group_index(self, n_layers: int) -> torch.Tensor:
        """For each entry of the flat vector: its block, or ``n_layers`` outside every block."""
        parts = [torch.full((self.offsets[i + 1] - self.offsets[i],), n_layers if layer is None else layer,
                            dtype=torch.long) for i, layer in enumerate(self.layers)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def flatten(self, grads: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """One flat vector from ``{name: grad}`` (a missing gradient counts as zeros)."""
        out = torch.zeros(self.size, dtype=dtype)
        for i, name in enumerate(self.names):
            g = grads.get(name)
            if g is not None:
                out[self.offsets[i]:self.offsets[i + 1]] = g.detach().reshape(-1).to(device="cpu", dtype=dtype)
        return out


def trainable(view: ModelView) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in view.model.named_parameters() if p.requires_grad]


def select_parameters(view: ModelView, patterns: Iterable[str] | None = None,
                      layers: Iterable[int] | None = None) -> tuple[str, ...]:
    """Names of the trainable parameters that match a pattern or lie in a listed block.

    With neither given, every trainable parameter. Raises ValueError for a block index
    out of range or a selection that matches nothing.
    """
    names = [n for n, _ in trainable(view)]
    if patterns is None and layers is None:
        return tuple(names)
    wanted_layers = set(layers or ())
    bad = sorted(x for x in wanted_layers if not 0 <= x < view.n_layers)
    if bad:
        raise ValueError(f"layers {bad} are out of range: {view.name} has blocks 0..{view.n_layers - 1}")
    layer_of = view.layer_of_parameter()
    pats = list(patterns or ())
    chosen = tuple(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)
                   or layer_of.get(n) in wanted_layers)
    if not chosen:
        raise ValueError(f"no parameter of {view.name} matches parameters={pats or None}, "
                         f"layers={sorted(wanted_layers) or None} (names look like {names[:3]})")
    return chosen


def layout_of(view: ModelView, names: Sequence[str] | None = None) -> Layout:
    """The layout of ``names`` (all trainable parameters when None) in ``named_parameters`` order."""
    params = dict(trainable(view))
    keep = set(params) if names is None else set(names)
    layer_of = view.layer_of_parameter()
    ordered = [n for n in params if n in keep]
    return Layout(tuple(ordered), tuple(tuple(params[n].shape) for n in ordered),
                  tuple(layer_of.get(n) for n in ordered))
