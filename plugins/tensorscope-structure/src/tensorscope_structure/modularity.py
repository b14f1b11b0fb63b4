"""structure.modularity: Newman Q of each MLP's unit graph and of the head composition graph, against a
weight-shuffled null."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    HeadValue,
    Interpretation,
    LayerValue,
    Metric,
    MetricResult,
    ModelView,
    Params,
    PreparedData,
    RunShape,
    ScalarValue,
    TextValue,
)

from .availability import plugin_loaded
from .communities import Modularity, against_null, null_bytes
from .graphs import head_block, mlp_blocks, mlp_inputs, read_bytes

QKOV = "circuits.qkov"
CIRCUITS_FIX = "pip install tensorscope-circuits"
#: rough operations per edge and Louvain run (local moves over a few levels), for the declared flops
LOUVAIN_OPS_PER_EDGE = 200


#: the per-block fields, in the order of ``_mlp_row``
MLP_FIELDS = ("q", "null_mean", "null_std", "z", "p_value", "communities", "edges")


def _mlp_row(m: Modularity | None) -> tuple[float, ...]:
    """One block's values in ``MLP_FIELDS`` order (NaN and 0 edges without a graph): only these numbers
    are kept across the layers, not each block's partition."""
    if m is None:
        return (float("nan"),) * (len(MLP_FIELDS) - 1) + (0.0,)
    return (m.q, m.null_mean, m.null_std, m.z, m.p_value, float(len(m.communities)), float(m.n_edges))


class ModularityParams(Params):
    resolution: float = Field(1.0, gt=0, description="Louvain / Newman resolution gamma (1: classic modularity)")
    n_permutations: int = Field(
        19, ge=1, description="weight-shuffled null graphs per graph; the smallest p-value is 1 / (n_permutations + 1)"
    )
    max_edges: int | None = Field(
        4096,
        ge=1,
        description="keep the strongest |W| entries of each MLP weight "
        "matrix (None: every entry); bounds the cost per layer",
    )
    heads: bool = Field(
        True, description="also the head composition graph from circuits.qkov, when the circuits plugin is installed"
    )
    composition: tuple[Literal["q", "k", "v"], ...] = Field(
        ("q", "k", "v"), min_length=1, description="composition kinds whose scores are summed into a head edge"
    )


class StructureModularity(Metric):
    """Newman modularity Q = (1/2m) sum_ij [A_ij - gamma k_i k_j / 2m] delta(c_i, c_j) of a Louvain
    partition (networkx ``louvain_communities`` with the run's seed and ``resolution`` gamma),
    compared with a weight-shuffled null.

    - **MLP unit graph**, per block: a layered graph of the d_model input units (the residual
      dimensions the MLP reads), the d_mlp hidden units and the d_model output units (the
      dimensions it writes), with A = |W_in| between input and hidden units (summed over the
      input projections of a gated MLP: |W_gate| + |W_up|) and A = |W_out| between hidden and
      output units. Biases and norm gains are left out. Of each matrix only the ``max_edges``
      strongest entries are kept (None: all), which bounds the cost; Q depends on it, so compare
      Q with its null, never across settings.
    - **Head composition graph** (from ``circuits.qkov``, asked by name when the circuits plugin is
      installed; otherwise this part is skipped with the fix): one node per head, an edge between
      heads of different layers weighted by the sum of their ``composition`` scores.
    - **Null**: each weight matrix's entries are permuted (the heads' scores among cross-layer
      pairs), the strongest entries kept, and the graph partitioned again, ``n_permutations``
      times. ``*_p_value`` = (1 + #{null Q >= Q}) / (1 + n_permutations), ``*_z`` = (Q - null
      mean) / null SD. ``*_communities`` counts the communities of the nodes that have an edge.
    """

    name = "structure.modularity"
    version = "1"
    summary = "Louvain modularity Q of each MLP's unit graph and of the head composition graph vs a shuffled null"
    Params = ModularityParams
    artifacts = ("weights",)
    supports_dispatch = True  # reads the MLP weights through view.weight_of, the heads' graph from circuits.qkov
    derived_from = tuple(f"{QKOV}.composition_{kind}" for kind in "qkv")  # the head graph's edge weights
    fields = {
        "mlp_q": "per block: Q of the MLP unit graph's Louvain partition",
        "mlp_null_mean": "per block: mean Q of the shuffled graphs",
        "mlp_null_std": "per block: their SD",
        "mlp_z": "per block: (Q - null mean) / null SD",
        "mlp_p_value": "per block: (1 + #{null Q >= Q}) / (1 + n_permutations)",
        "mlp_communities": "per block: number of communities",
        "mlp_edges": "per block: edges of the graph",
        "mlp_graph": "the MLP graph's nodes and how many entries were kept",
        "head_graph": "the head graph's source, or why it was skipped and the fix",
        "head_q": "Q of the head composition graph",
        "head_null_mean": "mean Q of its shuffled graphs",
        "head_null_std": "their SD",
        "head_z": "(Q - null mean) / null SD",
        "head_p_value": "(1 + #{null Q >= Q}) / (1 + n_permutations)",
        "head_communities": "number of communities",
        "head_community": "layer x head: community of each head (numbered by first head; -1: no edge)",
    }

    @classmethod
    def metric_needs(cls, params: ModularityParams) -> tuple[str, ...]:
        return (QKOV,) if params.heads and plugin_loaded("circuits") else ()

    @classmethod
    def skip_reason(cls, params: ModularityParams, view: ModelView, data: PreparedData | None) -> str | None:
        try:
            mlp_inputs(view, 0)
        except ValueError as exc:
            return f"{exc}: the MLP unit graph needs the MLP's input and output projections"
        return None

    @classmethod
    def cost(cls, params: ModularityParams, view: ModelView, shape: RunShape) -> Cost:
        """No state: each layer's graph lives in ``finalize`` only, one at a time; its working memory is
        the larger of a block's (a chunk of |W| with its top-k buffer, then one graph and its Louvain
        run) and the head graph's. FLOPs: reading up to three d_model x d_mlp matrices per block, and
        Louvain on the observed and every null graph."""
        d, h = view.d_model, view.d_mlp
        entries = d * h
        kept = entries if params.max_edges is None else min(entries, params.max_edges)
        edges = 2 * kept
        runs = params.n_permutations + 1
        flops = view.n_layers * (3.0 * entries + runs * LOUVAIN_OPS_PER_EDGE * edges)
        reading = max(read_bytes(h, d), read_bytes(d, h)) + cls._loaded_bytes(view)
        block = max(reading, null_bytes(edges, min(2 * d + h, 2 * edges), entries))
        heads = cls._head_bytes(view) if cls.metric_needs(params) else 0
        return Cost(state_bytes=0, finalize_bytes=max(block, heads), flops=flops)

    @staticmethod
    def _loaded_bytes(view: ModelView) -> int:
        """A block's MLP matrices, held while its edges are read (not in the Louvain runs): loaded tensors
        where a dispatched model offloaded them (``weight_of``), none where the model holds them."""
        if view.device_map is None:
            return 0
        try:
            return max((sum(view.loaded_bytes(m) for m in [*mlp_inputs(view, layer), view.mlp_out[layer]])
                        for layer in range(view.n_layers)), default=0)
        except ValueError:  # no MLP input projection: skip_reason says so
            return 0

    @staticmethod
    def _head_bytes(view: ModelView) -> int:
        """The head graph's working memory: its float64 [L, H, L, H] score sums (three at once), the
        candidate pairs' positions, and the graph of every cross-layer pair (the most it can keep)."""
        n = view.n_layers * view.n_heads
        pairs = view.n_heads**2 * view.n_layers * (view.n_layers - 1) // 2
        return 8 * (3 * n * n + pairs) + null_bytes(pairs, n, pairs)

    def finalize(self) -> dict[str, Any]:
        p, seed = self.params, self.shape.seed
        rows = []
        notes = []
        for layer in range(self.view.n_layers):
            blocks = mlp_blocks(self.view, layer, p.max_edges)
            try:
                m = against_null(blocks, p.resolution, p.n_permutations, seed, np.random.default_rng([seed, 1, layer]))
            except ValueError as exc:
                rows.append(_mlp_row(None))
                notes.append(f"block {layer}: {exc}")
            else:
                rows.append(_mlp_row(m))
        out: dict[str, Any] = {
            f"mlp_{field}": LayerValue(values=list(values), axis="block")
            for field, values in zip(MLP_FIELDS, zip(*rows, strict=True), strict=True)
        }
        d, h = self.view.d_model, self.view.d_mlp
        kept = "every entry" if p.max_edges is None else f"the strongest {min(p.max_edges, d * h)} of {d * h} entries"
        out["mlp_graph"] = TextValue(
            text=f"{d} input, {h} hidden and {d} output units; {kept} of each matrix kept"
            + "".join(f"; {n}" for n in notes)
        )
        out.update(self._heads())
        return out

    def _heads(self) -> dict[str, Any]:
        p = self.params
        if not p.heads:
            return {"head_graph": TextValue(text="not asked (heads=False)")}
        qkov = self.deps.get(QKOV)
        if qkov is None:
            return {
                "head_graph": TextValue(
                    text=f"skipped: the head composition graph needs {QKOV}, which no "
                    f"loaded plugin provides; fix: {CIRCUITS_FIX}"
                )
            }
        composition = sum(
            (self.tensor_of(qkov, f"composition_{kind}").double() for kind in dict.fromkeys(p.composition)),
            torch.zeros((), dtype=torch.float64),
        )
        block = head_block(composition)
        try:
            m = against_null(
                [block], p.resolution, p.n_permutations, self.shape.seed, np.random.default_rng([self.shape.seed, 2])
            )
        except ValueError as exc:
            return {"head_graph": TextValue(text=f"skipped: head composition graph: {exc}")}
        n_layers, n_heads = composition.shape[:2]
        community = np.full(n_layers * n_heads, -1)
        for index, members in enumerate(sorted(m.communities, key=min)):
            community[sorted(members)] = index
        kinds = "+".join(dict.fromkeys(p.composition))
        return {
            "head_graph": TextValue(
                text=f"{QKOV} composition scores ({kinds}), {n_layers * n_heads} heads, {m.n_edges} edges"
            ),
            "head_q": ScalarValue(value=m.q),
            "head_null_mean": ScalarValue(value=m.null_mean),
            "head_null_std": ScalarValue(value=m.null_std),
            "head_z": ScalarValue(value=m.z),
            "head_p_value": ScalarValue(value=m.p_value, n=p.n_permutations),
            "head_communities": float(len(m.communities)),
            "head_community": HeadValue(values=community.reshape(n_layers, n_heads).tolist()),
        }

    @classmethod
    def interpret(cls, result: MetricResult) -> list[Interpretation]:
        """The blocks whose MLP graph is more modular than every shuffled graph but a few (p <= 0.05)."""
        q, null, pv = (result.value(f"mlp_{f}") for f in ("q", "null_mean", "p_value"))
        return [
            Interpretation(
                text=f"MLP unit graph more modular than its shuffled null: Q {a:.3f} vs {b:.3f} (p = {c:.3g})",
                where=f"block {layer}",
            )
            for layer, (a, b, c) in enumerate(zip(q, null, pv, strict=True))
            if c is not None and a is not None and b is not None and c <= 0.05
        ]
