"""fisher.spectrum: the Fisher spectrum of every attention head and every MLP, by the Gram trick."""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    CountSketch,
    GradientStore,
    HeadValue,
    LayerValue,
    Metric,
    ModelView,
    Params,
    PreparedData,
    Rung,
    RunShape,
    ScalarValue,
    Step,
    StoreBacking,
    row_squares,
)

from .fisher_grads import ARTIFACT, FisherGrads, layout_of, layout_size, request
from .gram import gram_spectrum, nonzero_part
from .head_blocks import LayerPieces, layer_piece_sizes, layer_pieces
from .spectral import SUMMARY_KEYS, spectral_summary
from .values import finite_or_none

KEYS = (*SUMMARY_KEYS, "rank")
#: the ladder's count-sketch sizes, then the examples kept at the smallest
PROJECTIONS = (4096, 1024)


class SpectrumParams(Params):
    fisher: Literal["true", "empirical"] = Field("true", description="'true': labels drawn from the model; "
                                                 "'empirical': the observed labels")
    max_examples: int = Field(64, ge=1, description="examples (sequences) kept; the Gram matrix is n x n and "
                              "the state holds n gradients of the attention and MLP parameters")
    store: StoreBacking = Field("memory", description="where the kept gradients lie: 'memory', or 'disk' (a "
                                "scratch file per piece, read back in column blocks; the same numbers)")
    projection_dim: int | None = Field(
        None, ge=16, description="count-sketch each piece of more entries than this to this many (exact squared "
        "norms kept for the diagonal): each eigenvalue off by about sqrt(2/k) x its block's trace (RMS); "
        "None: exact")


#: pieces per model and layout: the plan asks for them once per rung it sizes, the run once more
_PIECES: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[str, ...], list[LayerPieces]]] = \
    weakref.WeakKeyDictionary()


def all_pieces(view: ModelView) -> list[LayerPieces]:
    """Per layer: its pieces, and per block (query heads in order, then the MLP) the pieces it sums."""
    layout = layout_of(view)
    known = _PIECES.setdefault(view.model, {})
    key = tuple(layout)
    if key not in known:
        known[key] = [layer_pieces(view, layer, layout) for layer in range(view.n_layers)]
    return known[key]


#: models up to this many parameters have their pieces listed entry by entry when a plan sizes them
#: (exact runs); larger ones (billions of entries) are sized from the views' shapes
EXACT_SIZING_PARAMS = 2**28


def piece_sizes(view: ModelView) -> list[list[tuple[int, int]]]:
    """Per layer, (entries, runs) of each piece, in ``LayerPieces.pieces`` order (once per plan)."""
    def sizes() -> list[list[tuple[int, int]]]:
        if view.n_params <= EXACT_SIZING_PARAMS:
            return [[(p.size, p.runs.shape[0]) for p in layer.pieces] for layer in all_pieces(view)]
        layout = layout_of(view)
        return [layer_piece_sizes(view, layer, layout) for layer in range(view.n_layers)]
    return view.memoised("fisher.piece_sizes", sizes)


def capacity(params: SpectrumParams, shape: RunShape) -> int:
    return min(params.max_examples, shape.n_sequences, shape.n_batches * shape.batch_size)


def sketched(params: SpectrumParams, size: int) -> bool:
    return params.projection_dim is not None and size > params.projection_dim


def piece_bytes(params: SpectrumParams, size: int, n: int, dtype_bytes: int) -> int:
    """RAM one piece's kept gradients take: a sketch [n, k] and exact squares (float64), or the store's."""
    if params.projection_dim is not None and sketched(params, size):
        return n * 8 * (params.projection_dim + 1)
    return GradientStore.declared_bytes(n, size, "none", dtype_bytes, params.store)


class Sketched:
    """Count-sketched rows of one piece [capacity, k] (float64) with their exact squared norms: the
    Gram matrix's off-diagonal from the sketch (unbiased, SD <= sqrt(2/k) |g||h|), its diagonal exact."""

    def __init__(self, size: int, k: int, seed: int, capacity: int) -> None:
        self.sketch = CountSketch(size, k, seed)
        self.rows = torch.zeros(capacity, k, dtype=torch.float64)
        self.squares = torch.zeros(capacity, dtype=torch.float64)
        self.n = 0

    def add(self, rows: torch.Tensor) -> None:
        self.rows[self.n:self.n + len(rows)] = self.sketch(rows)
        self.squares[self.n:self.n + len(rows)] = row_squares(rows)
        self.n += len(rows)

    def gram(self) -> torch.Tensor:
        rows = self.rows[:self.n]
        gram = rows @ rows.T
        gram.diagonal().copy_(self.squares[:self.n])
        return gram

    def close(self) -> None:
        """Nothing on disk (the interface of ``GradientStore``)."""


class Spectrum(Metric):
    """Fisher spectrum per block: each attention head (layer x head) and each MLP (layer).

    ``F_b = (1/n) Σ_i g_i,b g_i,bᵀ`` over the n examples (sequences), ``g_i,b`` the example's
    gradient (``fisher.per_example_grads``: its summed token NLL, labels drawn from the model for
    the true Fisher, observed for the empirical one) restricted to the block's entries, so F is the
    Fisher information per sequence. A head is its Q and O slices and its key/value head's K and V
    slices, with their biases (``head_blocks``: grouped-query heads share and each contain their
    key/value head's entries); an MLP is its block's parameters outside attention and norms.

    The eigenvalues come from the n x n Gram matrix ``G Gᵀ / n`` (same nonzero spectrum as the p x p
    ``GᵀG / n``, which is never formed), summed over disjoint pieces (``head_blocks.layer_pieces``: a
    query head's own entries, its key/value head's, the MLP), so shared key/value entries are kept once.
    ``store='disk'`` keeps the pieces' rows in scratch files (the same numbers); ``projection_dim`` k
    count-sketches each piece of more than k entries (exact squared norms on the diagonal): each
    eigenvalue is then off by at most about ``sqrt(2/k)`` x its block's trace (RMS, by Weyl's inequality
    and the sketch's entry-wise SD), reported as ``eig_error_rel``. ``trace``, ``eigmax``, ``energy_r8``,
    ``energy_r16`` and
    ``effective_rank`` (smallest k with energy ≥ 0.9) are those of the whole spectrum; ``eigmin`` and
    ``cond = eigmax / eigmin`` are over its **nonzero part** (the ``rank`` eigenvalues above the
    numerical-rank tolerance of ``gram.nonzero_part``), because F has at most n nonzero eigenvalues
    and p ≫ n: over all p eigenvalues, eigmin would be 0 and cond infinite for every block.
    Non-finite values (a block whose gradient is zero) are null. The first ``max_examples`` examples
    with a target are used, pooled over the run's tasks.
    """

    name = "fisher.spectrum"
    supports_dispatch = True  # reads the core's per-example rows; its head pieces come from view.head_entries
    version = "1"
    #: attn_trace is the trace of a head's Fisher block, the quantity fisher.grouped computes as true/head
    #: (and true/head_ov on the same parameters): equal by definition, never a finding
    derived_from = ("fisher.grouped.true/head", "fisher.grouped.true/head_ov")
    summary = "Fisher spectrum per attention head and per MLP (Gram trick): trace, eigmax, cond, energy, rank"
    Params = SpectrumParams
    artifacts = (ARTIFACT,)
    fields = {
        **{f"attn_{k}": f"per head (layer x head), {k} of the head's Fisher block" for k in KEYS},
        **{f"mlp_{k}": f"per layer, {k} of the MLP's Fisher block" for k in KEYS},
        "attn_eigenvalues": "tensor [n_layers, n_heads, n]: each head's n largest eigenvalues, descending",
        "mlp_eigenvalues": "tensor [n_layers, n]: each MLP's n largest eigenvalues, descending",
        "n_examples": "examples (sequences with at least one target) the Fisher averages over",
        "head_params": "entries of one head's block (layer 0, head 0)",
        "mlp_params": "entries of one MLP block (layer 0)",
        "eig_error_rel": "with projection_dim k: sqrt(2/k), the bound on each eigenvalue's RMS error relative to "
                         "its block's trace",
    }

    @classmethod
    def artifact_requests(cls, params: Any, view: ModelView) -> dict[str, Any]:
        """Every trainable parameter's scores, with the labels of its Fisher (``fisher``) only."""
        return {ARTIFACT: request((params.fisher,))}

    @classmethod
    def skip_reason(cls, params: SpectrumParams, view: ModelView, data: PreparedData | None) -> str | None:
        try:
            layer_pieces(view, 0, layout_of(view))
        except (NotImplementedError, ValueError) as exc:
            return f"fisher.spectrum needs the model's per-head weights: {exc}"
        return None

    @classmethod
    def cost(cls, params: SpectrumParams, view: ModelView, shape: RunShape) -> Cost:
        """The kept rows of every piece and its runs (int64 pairs): listed exactly up to
        ``EXACT_SIZING_PARAMS`` parameters, above that sized from the per-head views' shapes (runs an
        upper bound, a negligible part of the rows there)."""
        n = capacity(params, shape)
        layers = piece_sizes(view)
        held = sum(piece_bytes(params, size, n, view.dtype_bytes) + 16 * runs for layer in layers
                   for size, runs in layer)
        heads = view.n_heads
        # a query head's block sums its own piece and its key/value head's; the MLP is the last piece
        sizes = [layer[h][0] + layer[heads + kv][0] for layer in layers for h, kv in enumerate(view.kv_head_of)]
        sizes += [layer[-1][0] for layer in layers]
        # update: a piece's columns of the batch's chosen rows at a time, with their index (on the host and
        # on the device); a masked LM's rows without a masked token are left out by a copy of the others
        rows = min(shape.batch_size, n)
        largest = max((size for layer in layers for size, _ in layer), default=0)
        gather = rows * largest * view.dtype_bytes + 2 * 8 * largest
        chosen = 0 if view.causal else rows * layout_size(layout_of(view)) * view.dtype_bytes
        return Cost(state_bytes=held, flops=float(sum(2 * n * n * p + 10 * n**3 for p in sizes)),
                    transient_bytes=chosen + gather)

    @classmethod
    def ladder(cls, params: SpectrumParams, view: ModelView, shape: RunShape) -> Sequence[Rung]:
        """Rows on disk (exact; where the scratch folder has room), count sketches of 4096 and 1024,
        then half the examples; each offered only where it holds less RAM than the rung before."""
        n = capacity(params, shape)
        candidates = []
        if params.store == "memory" and params.projection_dim is None:
            sizes = [size for layer in piece_sizes(view) for size, _ in layer]
            need = sum(GradientStore.disk_bytes(n, size, "none", view.dtype_bytes) for size in sizes)
            if need < GradientStore.disk_room():
                candidates.append(Rung("disk", params.model_copy(update={"store": "disk"}),
                                       "exact, rows in scratch files (read back once in finalize)"))
        for k in PROJECTIONS:
            if params.projection_dim is None or k < params.projection_dim:
                candidates.append(Rung(f"project-{k}", params.model_copy(update={"projection_dim": k}),
                                       f"eigenvalues within ~{math.sqrt(2 / k):.3f} x their block's trace (RMS; "
                                       f"count sketch k={k}, exact diagonal)"))
        fewer = params.model_copy(update={"projection_dim": min(PROJECTIONS[-1], params.projection_dim or 2**62),
                                          "max_examples": max(1, n // 2)})
        candidates.append(Rung("fewer-examples", fewer, f"the first {max(1, n // 2)} examples of {n}, count "
                               f"sketch k={fewer.projection_dim}"))
        return cls.cheaper_rungs(params, view, shape, candidates)

    def setup(self) -> None:
        self.layers = all_pieces(self.view)
        n, k = capacity(self.params, self.shape), self.params.projection_dim
        self.stores: list[list[GradientStore | Sketched]] = [
            [Sketched(p.size, k, self.shape.seed * 100_003 + i, n) if k is not None and sketched(self.params, p.size)
             else GradientStore(p.size, backing=self.params.store) for i, p in enumerate(layer.pieces)]
            for layer in self.layers]
        self.filled = 0
        self.room = n

    def update(self, step: Step) -> None:
        value = FisherGrads.of(step[ARTIFACT])
        grads = value.scores(self.params.fisher)
        rows = (value.n_targets > 0).nonzero().flatten()[: self.room - self.filled]
        if not rows.numel():
            return
        # the first rows (every row of a causal LM has targets): a view, not a batch-sized copy
        prefix = bool(torch.equal(rows, torch.arange(rows.numel())))
        chosen = grads[:rows.numel()] if prefix else grads[rows.to(grads.device)]
        for layer, stores in zip(self.layers, self.stores, strict=True):
            for piece, store in zip(layer.pieces, stores, strict=True):
                store.add(piece.gather(chosen))
        self.filled += rows.numel()

    def finalize(self) -> dict[str, Any]:
        n = self.filled
        if n == 0:
            raise ValueError("fisher.spectrum saw no example with a loss target: give it sequences of at least "
                             "two tokens (causal) or with a mask token (masked LM)")
        eps = torch.finfo(next(self.view.model.parameters()).dtype).eps
        stats: dict[str, list[list[float | None]]] = {k: [] for k in KEYS}
        spectra = torch.zeros(self.view.n_layers, len(self.layers[0].blocks), n, dtype=torch.float64)
        for layer, (pieces, stores) in enumerate(zip(self.layers, self.stores, strict=True)):
            for k in KEYS:
                stats[k].append([])
            grams = [store.gram() for store in stores]
            for b, members in enumerate(pieces.blocks):
                eig = gram_spectrum(sum((grams[i] for i in members), torch.zeros(n, n, dtype=torch.float64)), n)
                spectra[layer, b] = eig
                part = nonzero_part(eig, n, pieces.block_size(b), eps)
                summary = {**spectral_summary(part), "rank": float(part.numel() if float(eig[0]) > 0 else 0)}
                for k in KEYS:
                    stats[k][layer].append(finite_or_none(summary[k]))
            for store in stores:
                store.close()
        out: dict[str, Any] = {}
        for k in KEYS:
            out[f"attn_{k}"] = HeadValue(values=[r[:-1] for r in stats[k]])
            out[f"mlp_{k}"] = LayerValue(values=[r[-1] for r in stats[k]], axis="block")
        out["attn_eigenvalues"], out["mlp_eigenvalues"] = spectra[:, :-1], spectra[:, -1]
        out["n_examples"] = ScalarValue(value=float(n), n=n)
        out["head_params"] = float(self.layers[0].block_size(0))
        out["mlp_params"] = float(self.layers[0].block_size(len(self.layers[0].blocks) - 1))
        if self.params.projection_dim is not None:
            out["eig_error_rel"] = ScalarValue(value=math.sqrt(2 / self.params.projection_dim))
        return out
