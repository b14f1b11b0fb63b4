"""Which parameter entries make up each attention head and each MLP: the blocks of a block-wise Fisher.

A query head ``h`` of layer ``l`` is ``W_Q[h]``, ``W_K[kv(h)]``, ``W_V[kv(h)]``, ``W_O[h]`` and the
Q/K/V bias slices of those heads (``ModelView.head_weights``; grouped-query heads read their
key/value head ``kv_head_of[h]``, so the heads of one group share, and each contains, that key/value
head's entries; the output bias belongs to no head). The MLP of layer ``l`` is every parameter of
block ``l`` outside its attention module and outside normalisation layers.

The entries are found from the adapter's per-head tensors themselves (``grouped.entries_of``):
they are views of the parameters, and their strides and storage offsets say which entries they
cover. So every adapter that maps heads works, with no knowledge of its layout here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from tensorscope_core.plugin_api import ModelView

from .grouped import entries_of


@dataclass(frozen=True)
class Block:
    """One block: ``index`` maps a parameter name to the flat (row-major) indices of its entries."""

    layer: int
    head: int | None  # None: the layer's MLP
    index: dict[str, torch.Tensor]

    @property
    def size(self) -> int:
        return sum(i.numel() for i in self.index.values())


def _entries(params: Mapping[str, nn.Parameter], parts: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameter name -> flat indices of the entries the ``parts`` (views of parameters) cover."""
    found: dict[str, list[torch.Tensor]] = {}
    for part in parts:
        name, idx = entries_of(part, params)
        found.setdefault(name, []).append(idx.reshape(-1))
    return {name: torch.unique(torch.cat(idx)) for name, idx in found.items()}


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def head_blocks(view: ModelView, layer: int) -> list[Block]:
    """The layer's query heads, in order (raises NotImplementedError when the adapter maps no heads,
    ValueError when its per-head weights are copies rather than views of the parameters)."""
    params = dict(view.model.named_parameters())
    hw = view.head_weights(layer)
    blocks = []
    for h in range(view.n_heads):
        kv = hw.kv_head_of[h]
        parts = [hw.W_Q[h], hw.W_K[kv], hw.W_V[kv], hw.W_O[h]]
        parts += [b[i] for b, i in ((hw.b_Q, h), (hw.b_K, kv), (hw.b_V, kv)) if b is not None]
        blocks.append(Block(layer, h, _entries(params, parts)))
    return blocks


def mlp_block(view: ModelView, layer: int) -> Block:
    """The layer's MLP: parameters of the block outside attention and normalisation layers."""
    attention = {id(p) for p in view.attn[layer].parameters()}
    names = {id(p): n for n, p in view.model.named_parameters()}
    index = {}
    for module in view.blocks[layer].modules():
        if _is_norm(module):
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in attention and id(p) in names:
                index[names[id(p)]] = torch.arange(p.numel())
    return Block(layer, None, index)
