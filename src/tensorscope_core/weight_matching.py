"""Weight matching of MLP units (Ainsworth et al., "Git Re-Basin", ICLR 2023) between two models.

Permuting the hidden units of a block's MLP, consistently in its input projections (rows of the
weights and biases that make the units) and its output projection (the columns that read them),
leaves the function unchanged. The residual stream is not permuted, so each block's matching is
its own linear assignment problem, solved exactly with ``scipy.optimize.linear_sum_assignment``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from .models.view import ModelView


@dataclass(frozen=True)
class UnitAxis:
    """A parameter and the axis along which it runs over the MLP's hidden units."""

    name: str
    axis: int


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # transformers' GPT-2 projection: weight [in, out]


def _out_axis(module: nn.Module) -> int:
    return 1 if _is_conv1d(module) else 0


def mlp_unit_axes(view: ModelView, layer: int) -> list[UnitAxis]:
    """The parameters of block ``layer``'s MLP that index its hidden units, with their unit axis.

    The input projections are the Linear / Conv1D siblings of ``mlp_out`` in the MLP module (GPT-2
    ``c_fc``, LLaMA ``gate_proj``/``up_proj``, NeoX ``dense_h_to_4h``); the output projection's weight
    reads the units along its input axis. Raises ValueError for MLPs laid out otherwise (BERT).
    """
    out = view.mlp_out[layer]
    params = dict(view.model.named_parameters())
    names = {id(p): n for n, p in params.items()}
    parent = next((m for m in view.blocks[layer].modules() if any(c is out for c in m.children())), None)
    siblings = list(parent.children()) if parent is not None else []
    ins = [c for c in siblings if c is not out and (isinstance(c, nn.Linear) or _is_conv1d(c))]
    if not ins:
        raise ValueError(f"cannot find the input projections of the MLP of block {layer} beside its output "
                         f"projection ({type(out).__name__}); alignment supports GPT-2, LLaMA and NeoX-style MLPs")
    axes = []
    for module in ins:
        axes.append(UnitAxis(names[id(module.weight)], _out_axis(module)))
        if getattr(module, "bias", None) is not None:
            axes.append(UnitAxis(names[id(module.bias)], 0))
    axes.append(UnitAxis(names[id(out.weight)], 1 - _out_axis(out)))
    for a in axes:
        size = params[a.name].shape[a.axis]
        if size != view.d_mlp:
            raise ValueError(f"{a.name} has {size} entries along its unit axis, not d_mlp = {view.d_mlp}")
    return axes


def aligned_bytes(view: ModelView) -> int:
    """Bytes of the weights ``align`` permutes (every block's MLP unit parameters), i.e. of the copies it
    makes; 0 for MLPs it does not support."""
    params = dict(view.model.named_parameters())
    try:
        names = {x.name for layer in range(view.n_layers) for x in mlp_unit_axes(view, layer)}
    except ValueError:
        return 0
    return sum(params[n].numel() * params[n].element_size() for n in names)


def _units(tensor: torch.Tensor, axis: int) -> torch.Tensor:
    """[d_mlp, everything else]: one row per hidden unit."""
    return tensor.movedim(axis, 0).reshape(tensor.shape[axis], -1).double()


def match_units(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], axes: list[UnitAxis]) -> torch.Tensor:
    """The permutation ``perm`` maximising ``sum_i <unit_i of a, unit perm[i] of b>`` over every
    parameter of the block's MLP: b's unit ``perm[i]`` is matched to a's unit i."""
    similarity = sum(_units(a[x.name], x.axis) @ _units(b[x.name], x.axis).T for x in axes)
    assert isinstance(similarity, torch.Tensor)
    rows, cols = linear_sum_assignment(similarity.cpu().numpy(), maximize=True)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return perm


def permute_units(weights: Mapping[str, torch.Tensor], axes: list[UnitAxis],
                  perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """``weights`` with the units of this MLP reordered: new unit i is old unit ``perm[i]``."""
    out = dict(weights)
    for x in axes:
        out[x.name] = weights[x.name].index_select(x.axis, perm.to(weights[x.name].device))
    return out


def align(view: ModelView, a: Mapping[str, torch.Tensor],
          b: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``b`` with every block's MLP units permuted to match ``a``, and the permutations [n_layers, d_mlp]."""
    aligned = dict(b)
    perms = []
    for layer in range(view.n_layers):
        axes = mlp_unit_axes(view, layer)
        perm = match_units(a, aligned, axes)
        aligned = permute_units(aligned, axes, perm)
        perms.append(perm)
    return aligned, torch.stack(perms)
