"""Newman modularity of a Louvain partition, against a weight-shuffled null with a permutation p-value."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np

from .graphs import EdgeBlock, graph_of

#: a null Q within this of the observed one counts as reaching it (Louvain sums in float64)
TIE = 1e-12
#: Python heap of a networkx graph and one Louvain run on it (its level graphs, neighbour dicts and
#: partition sets), per edge and per node: tracemalloc peaks (networkx 3.6, CPython 3.11) of MLP unit
#: graphs of 512 to 32,768 edges and head graphs of 486 to 35,235 edges agree within 10%
NX_BYTES_PER_EDGE = 660
NX_BYTES_PER_NODE = 1550
#: numpy's ``Generator.choice`` without replacement shuffles every candidate (int64) unless they are
#: over this many and the draw takes under 1 / SPARSE_DRAW of them (then Floyd's hash set, under 3 slots a pick)
DENSE_DRAW_CANDIDATES = 10_000
SPARSE_DRAW = 50


def null_bytes(n_edges: int, n_nodes: int, n_candidates: int) -> int:
    """Peak working memory of ``against_null`` on a graph of ``n_edges`` edges between ``n_nodes`` nodes
    drawn from ``n_candidates`` positions: one graph and its Louvain run (each freed before the next is
    built), the observed and one null's int64 positions and float64 weights with a draw's picks, order
    and reindexed positions (seven 8-byte values an edge), and the draw's shuffle or hash set."""
    dense = n_candidates <= DENSE_DRAW_CANDIDATES or n_edges > n_candidates // SPARSE_DRAW
    draw = n_candidates if dense else 3 * n_edges
    return NX_BYTES_PER_EDGE * n_edges + NX_BYTES_PER_NODE * n_nodes + 8 * (7 * n_edges + draw)


@dataclass(frozen=True)
class Modularity:
    """Q of the observed graph's Louvain partition, the null's Q values, and what follows from them."""

    q: float
    null: np.ndarray
    communities: list[set[int]]
    n_edges: int

    @property
    def null_mean(self) -> float:
        return float(self.null.mean())

    @property
    def null_std(self) -> float:
        return float(self.null.std(ddof=1)) if len(self.null) > 1 else float("nan")

    @property
    def p_value(self) -> float:
        """(1 + #{null Q >= Q}) / (1 + n_permutations): never 0, valid at finite permutation counts."""
        return float((1 + np.count_nonzero(self.null >= self.q - TIE)) / (1 + len(self.null)))

    @property
    def z(self) -> float:
        std = self.null_std
        return (self.q - self.null_mean) / std if std > 0 else float("nan")


def louvain_q(graph: nx.Graph, resolution: float, seed: int) -> tuple[float, list[set[int]]]:
    """Q = (1/2m) sum_ij [A_ij - gamma k_i k_j / 2m] delta(c_i, c_j) of networkx's Louvain partition."""
    communities = nx.community.louvain_communities(graph, weight="weight", resolution=resolution, seed=seed)
    return float(nx.community.modularity(graph, communities, weight="weight", resolution=resolution)), communities


def against_null(
    blocks: Sequence[EdgeBlock], resolution: float, n_permutations: int, seed: int, rng: np.random.Generator
) -> Modularity:
    """Q of the graph of ``blocks`` and of ``n_permutations`` graphs whose blocks are each shuffled.

    Louvain runs with the same ``seed`` on every graph; the shuffles draw from ``rng``. Raises
    ValueError for a graph without edges (Q is undefined there).
    """
    graph = graph_of(blocks)
    n_edges = graph.number_of_edges()
    if n_edges == 0:
        raise ValueError("the graph has no edge (every weight is zero)")
    q, communities = louvain_q(graph, resolution, seed)
    del graph  # one graph held at a time: each null's is built once this one is freed
    null = np.array(
        [louvain_q(graph_of([b.shuffled(rng) for b in blocks]), resolution, seed)[0] for _ in range(n_permutations)]
    )
    return Modularity(q, null, communities, n_edges)
