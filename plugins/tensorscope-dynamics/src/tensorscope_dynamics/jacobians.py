"""Block Jacobians by forward-mode AD: each block is called on its own, with exactly the
arguments the whole model passed it (captured by a pre-hook), so the causal / padding mask,
rotary position embeddings and position ids are the model's own. (A decoder block called
without them gets no causal mask: its Jacobian would be that of a bidirectional block.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import jvp, vmap

from tensorscope_core.plugin_api import ModelView, OneDeviceModel, stopped_before

BlockFn = Callable[[torch.Tensor], torch.Tensor]


def block_functions(
    view: ModelView, model: OneDeviceModel, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> list[tuple[BlockFn, torch.Tensor]]:
    """Per block, (x -> block output, the block's input on this batch), from one forward of ``model``
    (``OneDeviceModel(view, [])``: the copy without capture hooks, a dispatched model's weights loaded;
    one ``replay_forward``, stopped at the last block's input: neither that block, the final norm nor the
    logits are computed), each block then called alone through ``model.call_part``."""
    captured: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    handles = [
        copy.register_forward_pre_hook(
            lambda _m, args, kwargs, i=i: captured.__setitem__(i, (args, dict(kwargs))), with_kwargs=True
        )
        for i, copy in enumerate(model.view.blocks)
    ]
    try:  # the last block's input is the last thing read: its pre-hook keeps it, then the forward stops
        with torch.no_grad(), stopped_before(model.view.blocks[-1]):
            model(model.weights, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [_bound(model, block, *captured[i]) for i, block in enumerate(view.blocks)]


def _bound(model: OneDeviceModel, block: nn.Module, args: tuple[Any, ...],
           kwargs: dict[str, Any]) -> tuple[BlockFn, torch.Tensor]:
    def call(x: torch.Tensor) -> torch.Tensor:
        out = model.call_part(block, x, *args[1:], **kwargs) if args else \
            model.call_part(block, **{**kwargs, "hidden_states": x})
        return out[0] if isinstance(out, (tuple, list)) else out

    return call, (args[0] if args else kwargs["hidden_states"])


def hutchinson_sums(
    fn: BlockFn, x: torch.Tensor, keep: torch.Tensor, n_probes: int, generator: torch.Generator
) -> tuple[float, float]:
    """(sum over probes of |J v|^2, sum of |v|^2) with Rademacher v on the kept positions
    ``keep`` [batch, seq] (zero elsewhere) and J v read on the kept positions only, so their
    ratio estimates tr(J_kk^T J_kk) / dim for the Jacobian J_kk among kept positions."""
    out_sq, in_sq = 0.0, 0.0
    weight = keep.to(x.dtype).unsqueeze(-1)
    for _ in range(n_probes):
        v = (torch.randint(0, 2, x.shape, generator=generator).to(x.dtype) * 2 - 1) * weight
        with torch.no_grad():
            jv = jvp(fn, (x,), (v.to(x.device),))[1]
        out_sq += float((jv.double().cpu() * weight.double()).square().sum())
        in_sq += float(v.double().square().sum())
    return out_sq, in_sq


def local_jacobian(fn: BlockFn, x: torch.Tensor, row: int, position: int, chunk: int) -> torch.Tensor:
    """The dense d x d Jacobian d out[row, position] / d x[row, position] (float64), one
    forward-mode product per input direction, ``chunk`` at a time under vmap."""
    d = x.shape[-1]
    cols = []
    for start in range(0, d, chunk):
        width = min(chunk, d - start)
        tangents = torch.zeros((width, *x.shape), dtype=x.dtype, device=x.device)
        tangents[torch.arange(width), row, position, torch.arange(start, start + width)] = 1.0
        with torch.no_grad():
            jv = vmap(lambda v: jvp(fn, (x,), (v,))[1])(tangents)
        cols.append(jv[:, row, position, :].double().cpu())
    return torch.cat(cols).T  # [out, in]
