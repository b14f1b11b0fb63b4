"""Newman modularity of a Louvain partition, against a weight-shuffled null with a permutation p-value."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx
import numpy as np

from .graphs import EdgeBlock, graph_of

#: a null Q within this of the observed one counts as reaching it (Louvain sums in float64)
TIE = 1e-12


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
    if graph.number_of_edges() == 0:
        raise ValueError("the graph has no edge (every weight is zero)")
    q, communities = louvain_q(graph, resolution, seed)
    null = np.array(
        [louvain_q(graph_of([b.shuffled(rng) for b in blocks]), resolution, seed)[0] for _ in range(n_permutations)]
    )
    return Modularity(q, null, communities, graph.number_of_edges())
