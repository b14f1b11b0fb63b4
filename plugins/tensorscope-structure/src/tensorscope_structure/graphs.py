"""The weighted graphs structure.modularity partitions, as blocks of kept edges that a shuffle null can redraw.

A block is one weight matrix seen as edges between its rows and its columns (each a set of graph
nodes). The null of a block shuffles its weights over its candidate positions; a graph is the union
of its blocks, each shuffled on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch
from torch import nn

from tensorscope_core.plugin_api import ModelView, linear_out_in

#: entries of |W| read at once while finding the strongest edges (float32: 16 MiB)
CHUNK_ENTRIES = 1 << 22
#: bytes per entry of a chunk while its strongest entries are found: the float32 chunk and torch's CPU
#: top-k buffer of (value, int64 index) pairs, 16 bytes each (the in-place sum of a gated MLP's inputs
#: holds two float32 chunks, three for 16-bit weights: less)
READ_BYTES_PER_ENTRY = 4 + 16


@dataclass(frozen=True)
class EdgeBlock:
    """Kept edges of an ``n_rows x n_cols`` matrix: flat ``positions`` (row * n_cols + col) with
    ``weights`` > 0; row i is graph node ``row_offset + i``, column j is node ``col_offset + j``.
    ``candidates`` are the flat positions an edge may take (None: all of them)."""

    positions: np.ndarray
    weights: np.ndarray
    n_rows: int
    n_cols: int
    row_offset: int
    col_offset: int
    candidates: np.ndarray | None = None

    @property
    def n_candidates(self) -> int:
        return self.n_rows * self.n_cols if self.candidates is None else len(self.candidates)

    def edges(self) -> list[tuple[int, int, float]]:
        rows, cols = np.divmod(self.positions, self.n_cols)
        return list(
            zip(
                (rows + self.row_offset).tolist(), (cols + self.col_offset).tolist(), self.weights.tolist(), strict=True
            )
        )

    def shuffled(self, rng: np.random.Generator) -> EdgeBlock:
        """The null draw: the same weights at distinct candidate positions drawn uniformly at random.

        Permuting every entry of the matrix and keeping the same strongest ones gives exactly this:
        the kept values are the same multiset and land on a uniformly random set of positions in a
        uniformly random order. Drawn without forming the permutation (Floyd's algorithm for few
        edges), so a null costs O(kept edges), not O(matrix). The edges are put in position order,
        as the observed ones are, so the graph is built (and Louvain visits it) the same way.
        """
        picks = rng.choice(self.n_candidates, size=len(self.weights), replace=False)
        order = np.argsort(picks)
        positions = picks[order] if self.candidates is None else self.candidates[picks[order]]
        return EdgeBlock(
            np.asarray(positions, dtype=np.int64),
            self.weights[order],
            self.n_rows,
            self.n_cols,
            self.row_offset,
            self.col_offset,
            self.candidates,
        )


class UnitGraph(nx.Graph):
    """An ``nx.Graph`` whose edge and degree views are made at each use instead of cached on it.

    A cached view refers back to its graph: a reference cycle that only the cyclic garbage collector
    frees, which may take many Louvain runs. Louvain makes every level's graph with ``G.__class__()``,
    so with this class each graph is freed as soon as its run drops it.
    """

    @property  # type: ignore[override]
    def edges(self) -> nx.classes.reportviews.EdgeView:
        return nx.classes.reportviews.EdgeView(self)

    @property  # type: ignore[override]
    def degree(self) -> nx.classes.reportviews.DegreeView:
        return nx.classes.reportviews.DegreeView(self)


def graph_of(blocks: Sequence[EdgeBlock]) -> nx.Graph:
    """The undirected weighted graph of the blocks' edges (nodes without an edge are left out)."""
    graph = UnitGraph()
    for block in blocks:
        graph.add_weighted_edges_from(block.edges())
    return graph


def read_bytes(n_rows: int, n_cols: int) -> int:
    """Peak working memory of ``strongest`` on an n_rows x n_cols matrix: one chunk of rows and its top-k buffer."""
    return min(n_rows, max(1, CHUNK_ENTRIES // max(1, n_cols))) * n_cols * READ_BYTES_PER_ENTRY


def strongest(
    rows_of: Callable[[int, int], torch.Tensor], n_rows: int, n_cols: int, max_edges: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Flat positions and values of the ``max_edges`` largest entries (None: all) of the n_rows x
    n_cols matrix whose rows ``rows_of(start, stop)`` returns (non-negative, float32), zeros dropped.
    Reads the matrix a chunk of rows at a time and keeps at most 2 x max_edges candidates."""
    keep = n_rows * n_cols if max_edges is None else min(max_edges, n_rows * n_cols)
    step = max(1, CHUNK_ENTRIES // max(1, n_cols))
    values = torch.zeros(0, dtype=torch.float32)
    positions = torch.zeros(0, dtype=torch.int64)
    for start in range(0, n_rows, step):
        chunk = rows_of(start, min(start + step, n_rows)).reshape(-1)
        top = torch.topk(chunk, min(keep, chunk.numel()), sorted=False)
        values = torch.cat([values, top.values])
        positions = torch.cat([positions, top.indices + start * n_cols])
        if values.numel() > keep:
            best = torch.topk(values, keep, sorted=False).indices
            values, positions = values[best], positions[best]
    order = torch.argsort(positions)  # a canonical order: the graph does not depend on how it was chunked
    values, positions = values[order], positions[order]
    nonzero = values > 0
    return positions[nonzero].numpy(), values[nonzero].double().numpy()


def _linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"  # transformers' GPT-2 projection


def mlp_inputs(view: ModelView, layer: int) -> list[nn.Module]:
    """The projections that make block ``layer``'s MLP hidden units: the linear-like modules of the
    block, outside its attention, whose weight is [d_mlp, d_model] (GPT-2 ``c_fc``, LLaMA
    ``gate_proj`` and ``up_proj``, BERT ``intermediate.dense``). Raises ValueError when there is none."""
    attention = {id(m) for m in view.attn[layer].modules()}
    out = view.mlp_out[layer]
    found = [
        m
        for m in view.blocks[layer].modules()
        if _linear_like(m)
        and m is not out
        and id(m) not in attention
        and tuple(linear_out_in(m).shape) == (view.d_mlp, view.d_model)
    ]
    if not found:
        raise ValueError(
            f"block {layer} has no linear projection [d_mlp={view.d_mlp}, d_model={view.d_model}] "
            "outside its attention feeding the MLP output projection"
        )
    return found


def mlp_blocks(view: ModelView, layer: int, max_edges: int | None) -> list[EdgeBlock]:
    """The unit graph of block ``layer``'s MLP: input units 0..d-1 (the residual dimensions it reads),
    hidden units d..d+h-1 and output units d+h..2d+h-1 (the residual dimensions it writes), with
    A = |W_in| (summed over the input projections of a gated MLP) and |W_out|, each matrix's
    ``max_edges`` strongest entries kept."""
    d, h = view.d_model, view.d_mlp
    # read through weight_of: a dispatched model's offloaded weights are loaded (one block's at a time)
    ins = [linear_out_in(m, view.weight_of(m)) for m in mlp_inputs(view, layer)]  # [h, d] each
    w_out = linear_out_in(view.mlp_out[layer], view.weight_of(view.mlp_out[layer]))  # [d, h]

    def in_rows(start: int, stop: int) -> torch.Tensor:
        total = torch.zeros(stop - start, d)
        for w in ins:
            total += w[start:stop].float().abs().cpu()  # in place: two chunks held, not four
        return total

    def out_rows(start: int, stop: int) -> torch.Tensor:
        return w_out[start:stop].float().abs().cpu()

    blocks = []
    for rows_of, n_rows, n_cols, row_offset, col_offset in ((in_rows, h, d, d, 0), (out_rows, d, h, d + h, d)):
        positions, weights = strongest(rows_of, n_rows, n_cols, max_edges)
        blocks.append(EdgeBlock(positions, weights, n_rows, n_cols, row_offset, col_offset))
    return blocks


def head_block(composition: torch.Tensor) -> EdgeBlock:
    """The head composition graph from scores [L, H, L, H] (earlier head, later head): node l * H + h,
    an edge between heads of layers l1 < l2 weighted by the score; the candidate positions are
    every such pair, so the null shuffles scores among cross-layer pairs only."""
    n_layers, n_heads = composition.shape[:2]
    n = n_layers * n_heads
    layer = torch.arange(n) // n_heads
    allowed = (layer[:, None] < layer[None, :]).reshape(-1)
    candidates = torch.nonzero(allowed).flatten()
    scores = composition.double().reshape(-1)[candidates]
    kept = scores > 0
    return EdgeBlock(candidates[kept].numpy(), scores[kept].numpy(), n, n, 0, 0, candidates.numpy())
