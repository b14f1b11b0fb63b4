"""Parameter subsets and the flat layout every gradient metric of this plugin uses.

A gradient is flattened by concatenating its parameter tensors in ``named_parameters``
order (tied parameters once, under their first name). ``Layout`` records where each
parameter lies in that vector and which block (``view.blocks[l]``) owns it.

A subset is chosen by parameter name patterns and block indices and, optionally, by
per-parameter boolean masks that another metric provides (``mask_metric``): ``Subset``
holds the chosen parameters and, with masks, which entries of their flat vector are kept.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from pydantic import Field

from tensorscope_core.plugin_api import Metric, MetricResult, ModelView, Params, ScalarValue, TensorValue


class SubsetParams(Params):
    """Parameters shared by the metrics that can work on a subset of the model's parameters."""

    parameters: list[str] | None = Field(
        None, description="glob patterns (fnmatch) of parameter names to use, e.g. ['lm_head.*']; "
                          "None: no restriction by name")
    layers: list[int] | None = Field(
        None, description="block indices whose parameters to use; None: no restriction by block")
    mask_metric: str | None = Field(
        None, description="a metric whose result holds per-parameter boolean masks, one field "
                          "'<mask_field_prefix><parameter name>' per parameter shaped like it (e.g. 'fisher.masks'): "
                          "only the masked entries of the selected parameters that have a mask are used; "
                          "None: no masks")
    mask_field_prefix: str = Field(
        "mask/", description="prefix of the mask fields in the mask metric's result (e.g. 'mask/math/' for one "
                             "task's masks)")


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

    def by_block(self, n_layers: int, entries: torch.Tensor | None = None) -> list[tuple[Layout, torch.Tensor | None]]:
        """Per block l (then ``n_layers``: everything outside the blocks), the layout of its parameters
        and, with ``entries`` (sorted indices into this layout's vectors), the block's entries as
        indices into its own layout's vectors."""
        out: list[tuple[Layout, torch.Tensor | None]] = []
        for group in range(n_layers + 1):
            own = [i for i, layer in enumerate(self.layers) if (n_layers if layer is None else layer) == group]
            sub = Layout(tuple(self.names[i] for i in own), tuple(self.shapes[i] for i in own),
                         tuple(self.layers[i] for i in own))
            if entries is None:
                out.append((sub, None))
                continue
            parts: list[torch.Tensor] = []
            for k, i in enumerate(own):
                start, stop = self.offsets[i], self.offsets[i + 1]
                lo, hi = (int(torch.searchsorted(entries, x)) for x in (start, stop))
                parts.append(entries[lo:hi] - start + sub.offsets[k])
            out.append((sub, torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)))
        return out

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
    out of range or a selection that matches nothing. Worked out once per plan (``ModelView.memoised``).
    """
    pats = None if patterns is None else tuple(patterns)
    blocks = None if layers is None else tuple(layers)
    return view.memoised(("gradients.select_parameters", pats, blocks), lambda: _select_parameters(view, pats, blocks))


def _select_parameters(view: ModelView, patterns: Iterable[str] | None,
                       layers: Iterable[int] | None) -> tuple[str, ...]:
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


# -- masks from another metric ----------------------------------------------------------------


@dataclass(frozen=True)
class Subset:
    """The parameters a metric uses and, with masks, the entries of their flat vector it keeps.

    ``names`` are in ``named_parameters`` order; ``entries`` are sorted indices into the
    concatenation of those parameters' flattened gradients (``layout_of(view, names)``), None
    when every entry is kept (``subset_size`` gives the length of the vectors kept).
    """

    names: tuple[str, ...]
    entries: torch.Tensor | None = None

    def columns(self, layout: Layout) -> torch.Tensor | None:
        """Indices of the kept entries in vectors of ``layout`` (which holds at least ``names``);
        None when that is all of ``layout``'s entries in order."""
        columns = layout.columns(self.names)
        if self.entries is None:
            return columns
        return self.entries if columns is None else columns[self.entries]


def subset_size(view: ModelView, subset: Subset) -> int:
    """Length of the vectors a metric keeps for ``subset``."""
    return int(subset.entries.numel()) if subset.entries is not None else layout_of(view, subset.names).size


def planned_size(view: ModelView, params: SubsetParams) -> tuple[int, int]:
    """For declared costs, before any mask is read: the length of the vectors kept (an upper
    bound with ``mask_metric``: every entry of the selected parameters) and the bytes of the
    kept entries' int64 indices (0 without masks, else that upper bound x 8)."""
    try:
        size = layout_of(view, select_parameters(view, params.parameters, params.layers)).size
    except ValueError:
        size = 0
    return size, 8 * size if params.mask_metric is not None else 0


def canonical_names(view: ModelView) -> dict[str, str]:
    """Every name of a trainable parameter, aliases of tied parameters included -> the name it has
    in ``named_parameters`` (its first name)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in view.model.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            out[name] = first.setdefault(id(p), name)
    return out


TensorOf = Callable[[MetricResult, str], torch.Tensor]


def read_masks(view: ModelView, result: MetricResult, prefix: str, tensor_of: TensorOf) -> dict[str, torch.Tensor]:
    """The boolean masks in ``result``: ``{parameter name: mask}`` from its fields
    ``<prefix><parameter name>``, each a tensor of the parameter's shape holding booleans, or
    numbers that are all 0 or 1. A one-entry mask may be a scalar (the core stores one-element
    tensors as scalars). A tied parameter may be named by any of its names.

    ``tensor_of(result, field)`` gives a field's array (``Metric.tensor_of``). Raises
    ValueError for a field that names no trainable parameter, a shape that differs from the
    parameter's, values other than 0/1, two masks for one parameter, or no mask field at all.
    """
    names = canonical_names(view)
    params = dict(view.model.named_parameters())
    masks: dict[str, torch.Tensor] = {}
    where = f"mask metric {result.metric!r}"
    for field, value in result.values.items():
        if not field.startswith(prefix) or "/" in field[len(prefix):]:
            continue  # another prefix, or a per-task mask ('mask/<task>/<param>') under the pooled prefix
        alias = field[len(prefix):]
        if alias not in names:
            raise ValueError(f"{where}: field {field!r} names no trainable parameter of {view.name} "
                             f"(names look like {list(params)[:3]})")
        name = names[alias]
        if name in masks:
            raise ValueError(f"{where}: two mask fields for parameter {name!r} (tied names)")
        shape = tuple(params[name].shape)
        if isinstance(value, TensorValue):
            mask = tensor_of(result, field)
        elif isinstance(value, ScalarValue) and params[name].numel() == 1:
            mask = torch.tensor(float("nan") if value.value is None else value.value).reshape(shape)
        else:
            raise ValueError(f"{where}: field {field!r} is a {value.kind} value, not a mask tensor")
        if tuple(mask.shape) != shape:
            raise ValueError(f"{where}: mask {field!r} has shape {list(mask.shape)}, parameter {name!r} has "
                             f"{list(shape)}")
        if mask.dtype != torch.bool:
            if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"{where}: mask {field!r} ({mask.dtype}) holds values other than 0 and 1: "
                                 "a mask is boolean (or 0/1)")
            mask = mask != 0
        masks[name] = mask.detach().cpu()
    if not masks:
        raise ValueError(f"{where} has no mask fields: expected fields named '{prefix}<parameter name>', "
                         f"it has {sorted(result.values)[:5]}")
    return masks


def resolve_subset(view: ModelView, params: SubsetParams, deps: Mapping[str, MetricResult],
                   tensor_of: TensorOf) -> Subset:
    """The parameters (``parameters`` / ``layers``) and, with ``mask_metric``, the masked entries.

    With masks, a parameter is used when it is selected *and* has a mask; its entries where
    the mask is true. Raises ValueError when nothing is left.
    """
    names = select_parameters(view, params.parameters, params.layers)
    if params.mask_metric is None:
        return Subset(names)
    masks = read_masks(view, deps[params.mask_metric], params.mask_field_prefix, tensor_of)
    kept = tuple(n for n in names if n in masks)
    parts, offset = [], 0
    for name in kept:
        flat = masks[name].reshape(-1)
        parts.append(torch.nonzero(flat).flatten() + offset)
        offset += flat.numel()
    entries = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    if entries.numel() == 0:
        raise ValueError(f"the masks of {params.mask_metric!r} select no entry of the chosen parameters "
                         f"({len(kept)} of {len(names)} selected parameters have a mask)")
    return Subset(kept, entries)


class SubsetMetric(Metric):
    """Base of the metrics that take ``SubsetParams``: they also need ``mask_metric`` when given."""

    @classmethod
    def metric_needs(cls, params: Any) -> tuple[str, ...]:
        mask = getattr(params, "mask_metric", None)
        return cls.requires_metrics + ((mask,) if mask and mask not in cls.requires_metrics else ())

    def subset(self) -> Subset:
        """This instance's subset (call in ``setup``: ``self.deps`` holds the mask metric's result)."""
        return resolve_subset(self.view, self.params, self.deps, self.tensor_of)
