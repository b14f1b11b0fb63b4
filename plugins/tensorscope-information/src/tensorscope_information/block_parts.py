"""information.block_parts: the parts of a block that the PID's sources are read from.

A parameterised artifact: each consumer asks for (part, layer) pairs, so only those are kept.
Parts: ``attn`` (output of the attention output projection ``view.attn_out[l]``: what attention
writes before any residual add or norm), ``heads`` (its input: the heads' outputs concatenated
head-major), ``mlp`` (output of the MLP output projection ``view.mlp_out[l]``) and ``resid``
(the residual stream entering block l, or leaving the last block for l = n_layers, as the
core's ``resid``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from tensorscope_core.plugin_api import ArtifactSpec, CaptureContext, ModelView, first_tensor

NAME = "information.block_parts"
Part = Literal["attn", "heads", "mlp", "resid"]


@dataclass
class BlockParts:
    """{(part, layer): tensor [batch, seq, width]} of one batch; joins micro-batches itself."""

    tensors: dict[tuple[str, int], torch.Tensor]

    @classmethod
    def cat(cls, parts: Sequence[BlockParts]) -> BlockParts:
        return cls({key: torch.cat([p.tensors[key] for p in parts]) for key in parts[0].tensors})


def _wanted(request: Any) -> list[tuple[str, int]]:
    return sorted({(str(part), int(layer)) for part, layer in request.get("parts", ())})


def _merge(requests: Sequence[Any]) -> dict[str, Any]:
    return {"parts": tuple(sorted({tuple(key) for r in requests for key in r.get("parts", ())}))}


def _width(view: ModelView, part: str) -> int:
    return view.n_heads * view.d_head if part == "heads" else view.d_model


def _bytes(view: ModelView, batch: int, seq: int, request: Any) -> int:
    return sum(batch * seq * _width(view, part) * view.dtype_bytes for part, _ in _wanted(request))


def _install(ctx: CaptureContext) -> None:
    view = ctx.view

    def keep(key: tuple[str, int], tensor: torch.Tensor) -> None:
        ctx.store.setdefault(NAME, BlockParts({})).tensors[key] = tensor.detach()

    for part, layer in _wanted(ctx.request(NAME)):
        key = (part, layer)
        if part == "heads":
            ctx.forward_hook(
                view.attn_out[layer],
                lambda m, a, kw, key=key: keep(key, a[0] if a else next(iter(kw.values()))),
                pre=True,
            )
        elif part in ("attn", "mlp"):
            module = (view.attn_out if part == "attn" else view.mlp_out)[layer]
            ctx.forward_hook(module, lambda m, a, kw, out, key=key: keep(key, first_tensor(out)))
        elif layer < view.n_layers:
            ctx.forward_hook(
                view.blocks[layer], lambda m, a, kw, key=key: keep(key, a[0] if a else kw["hidden_states"]), pre=True
            )
        else:
            ctx.forward_hook(view.blocks[-1], lambda m, a, kw, out, key=key: keep(key, first_tensor(out)))


BLOCK_PARTS = ArtifactSpec(
    name=NAME,
    pass_kind="forward",
    doc="the (part, layer) pairs its consumers ask for: attention / MLP output projections' outputs, the heads' "
    "concatenated outputs, or the residual stream, each [batch, seq, width]",
    nbytes=lambda view, batch, seq: 0,
    install=_install,
    merge=_merge,
    request_nbytes=_bytes,
)
