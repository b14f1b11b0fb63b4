"""Which parameter entries make up each attention head and each MLP: the blocks of a block-wise Fisher,
as disjoint pieces (a query head's own entries, a key/value head's, the MLP) whose Gram matrices add up.

A query head ``h`` of layer ``l`` is ``W_Q[h]``, ``W_K[kv(h)]``, ``W_V[kv(h)]``, ``W_O[h]`` and the
Q/K/V bias slices of those heads (``ModelView.head_weights``; grouped-query heads read their
key/value head ``kv_head_of[h]``, so the heads of one group share, and each contains, that key/value
head's entries; the output bias belongs to no head). The MLP of layer ``l`` is every parameter of
block ``l`` outside its attention module and outside normalisation layers.

The entries are found from the adapter's per-head tensors themselves (``ModelView.head_entries``):
they are views of the parameters, and their strides and storage offsets say which entries they
cover. So every adapter that maps heads works, with no knowledge of its layout here, and so does a
dispatched model (the entries are read while its attention module is loaded).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tensorscope_core.plugin_api import HeadEntries, ModelView, ParameterEntries

from .fisher_grads import Layout


@dataclass(frozen=True)
class Piece:
    """Entries of a layer's parameters, as ``runs`` [r, 2] (start, stop) of the flat gradient layout:
    disjoint pieces whose Gram matrices add up to each block's."""

    runs: torch.Tensor

    @property
    def size(self) -> int:
        return int((self.runs[:, 1] - self.runs[:, 0]).sum())

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """The piece's columns of ``rows`` [n, P], in layout order."""
        lengths = self.runs[:, 1] - self.runs[:, 0]
        offsets = torch.cumsum(lengths, 0) - lengths
        index = torch.repeat_interleave(self.runs[:, 0] - offsets, lengths) + torch.arange(int(lengths.sum()))
        return rows.index_select(1, index.to(rows.device))


@dataclass(frozen=True)
class LayerPieces:
    """A layer's pieces and, per block (its query heads in order, then its MLP), which pieces it sums."""

    pieces: list[Piece]
    blocks: list[tuple[int, ...]]

    def block_size(self, block: int) -> int:
        return sum(self.pieces[i].size for i in self.blocks[block])


Part = tuple[ParameterEntries, int]  # a factor's entries, and which head's slice of it


def _entries(parts: list[Part], layout: Layout) -> torch.Tensor:
    """The positions in the flat layout of the entries the ``parts`` cover, sorted, once."""
    flat = [layout[e.name][0].start + e.index()[h].reshape(-1) for e, h in parts]
    return torch.from_numpy(np.unique(torch.cat(flat).numpy()))  # numpy's sort: ~50x torch's on the CPU


def _head_parts(heads: HeadEntries, n_heads: int) -> list[list[Part]]:
    """Per query head its own factors' slices (W_Q[h], W_O[h], b_Q[h]), then per key/value head its
    (W_K, W_V, b_K, b_V)."""
    own = [[(heads.W_Q, h), (heads.W_O, h), *([(heads.b_Q, h)] if heads.b_Q is not None else [])]
           for h in range(n_heads)]
    shared = [[(heads.W_K, kv), (heads.W_V, kv), *[(b, kv) for b in (heads.b_K, heads.b_V) if b is not None]]
              for kv in range(max(heads.kv_head_of) + 1)]
    return [*own, *shared]


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _runs(flat: torch.Tensor) -> torch.Tensor:
    """[r, 2] maximal runs (start, stop) of the sorted distinct positions ``flat``."""
    breaks = torch.nonzero(flat[1:] != flat[:-1] + 1).flatten() + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long), breaks])
    stops = torch.cat([breaks, torch.tensor([flat.numel()])])
    return torch.stack([flat[starts], flat[stops - 1] + 1], dim=1)


def layer_pieces(view: ModelView, layer: int, layout: Layout) -> LayerPieces:
    """Per query head h its own entries (W_Q[h], W_O[h], b_Q[h]), per key/value head its entries (W_K,
    W_V, b_K, b_V), and the MLP; head h's block sums its own piece and its key/value head's (raises
    NotImplementedError when the adapter maps no heads, ValueError when its per-head weights are copies
    rather than views of the parameters)."""
    heads = view.head_entries(layer)
    pieces = [Piece(_runs(_entries(parts, layout))) for parts in _head_parts(heads, view.n_heads)]
    pieces.append(Piece(_mlp_runs(view, layer, layout)))
    blocks = [(h, view.n_heads + heads.kv_head_of[h]) for h in range(view.n_heads)]
    return LayerPieces(pieces, [*blocks, (len(pieces) - 1,)])


def _contiguous_runs(part: torch.Tensor) -> int:
    """How many maximal runs of consecutive entries a view covers, read from its shape and strides: its
    dimensions taken in memory order (by stride), whatever order the view puts them in (a head's W_Q is a
    transposed view of whole rows of the query projection: one run)."""
    run, expected = 1, 1
    for stride, size in sorted((stride, size) for size, stride in zip(part.shape, part.stride(), strict=True)
                               if size != 1):
        if stride != expected:
            break
        run *= size
        expected *= size
    return part.numel() // max(run, 1)


def layer_piece_sizes(view: ModelView, layer: int, layout: Layout) -> list[tuple[int, int]]:
    """(entries, runs) of each of ``layer_pieces``' pieces, from the per-head views' shapes and strides
    alone: what sizing a plan needs, without listing the entries (a 7B model has billions). Runs are an
    upper bound (parts that happen to abut count apart)."""
    heads = [[e.index("meta")[h] for e, h in parts]
             for parts in _head_parts(view.head_entries(layer), view.n_heads)]
    sizes = [(sum(p.numel() for p in parts), sum(_contiguous_runs(p) for p in parts)) for parts in heads]
    mlp = _mlp_runs(view, layer, layout)
    return [*sizes, (int((mlp[:, 1] - mlp[:, 0]).sum()), mlp.shape[0])]


def _mlp_runs(view: ModelView, layer: int, layout: Layout) -> torch.Tensor:
    """The layer's MLP, every entry of the block's parameters outside attention and normalisation layers,
    as one run per parameter (in layout order)."""
    attention = {id(p) for p in view.attn[layer].parameters()}
    names = {id(p): n for n, p in view.model.named_parameters()}
    spans = []
    for module in view.blocks[layer].modules():
        if _is_norm(module):
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in attention and id(p) in names:
                sl = layout[names[id(p)]][0]
                spans.append((sl.start, sl.stop))
    return torch.tensor(sorted(spans), dtype=torch.long).reshape(-1, 2)
