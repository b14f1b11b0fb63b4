"""fisher.spectrum: the Fisher spectrum of every attention head and every MLP, by the Gram trick."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    HeadValue,
    LayerValue,
    Metric,
    ModelView,
    Params,
    PreparedData,
    RunShape,
    ScalarValue,
    Step,
)

from .fisher_grads import ARTIFACT, REQUEST, FisherGrads, layout_of
from .gram import gram_eigenvalues, nonzero_part
from .head_blocks import Block, head_blocks, mlp_block
from .spectral import SUMMARY_KEYS, spectral_summary
from .values import finite_or_none

KEYS = (*SUMMARY_KEYS, "rank")


class SpectrumParams(Params):
    fisher: Literal["true", "empirical"] = Field("true", description="'true': labels drawn from the model; "
                                                 "'empirical': the observed labels")
    max_examples: int = Field(64, ge=1, description="examples (sequences) kept; the Gram matrix is n x n and "
                              "the state holds n gradients of the attention and MLP parameters")


def all_blocks(view: ModelView) -> list[list[Block]]:
    """Per layer: its query heads in order, then its MLP."""
    return [[*head_blocks(view, layer), mlp_block(view, layer)] for layer in range(view.n_layers)]


def _columns(view: ModelView, blocks: list[list[Block]]) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """The artifact columns any block needs (sorted) and each block's positions among them."""
    layout = layout_of(view)
    per_block = [[torch.cat([layout[name][0].start + idx for name, idx in b.index.items()]) for b in row]
                 for row in blocks]
    union = torch.unique(torch.cat([c for row in per_block for c in row]))
    return union, [[torch.searchsorted(union, c) for c in row] for row in per_block]


def capacity(params: SpectrumParams, shape: RunShape) -> int:
    return min(params.max_examples, shape.n_sequences, shape.n_batches * shape.batch_size)



class Spectrum(Metric):
    """Fisher spectrum per block: each attention head (layer x head) and each MLP (layer).

    ``F_b = (1/n) Σ_i g_i,b g_i,bᵀ`` over the n examples (sequences), ``g_i,b`` the example's
    gradient (``fisher.per_example_grads``: its summed token NLL, labels drawn from the model for
    the true Fisher, observed for the empirical one) restricted to the block's entries, so F is the
    Fisher information per sequence. A head is its Q and O slices and its key/value head's K and V
    slices, with their biases (``head_blocks``: grouped-query heads share and each contain their
    key/value head's entries); an MLP is its block's parameters outside attention and norms.

    The eigenvalues come from the n x n Gram matrix ``G Gᵀ / n`` (same nonzero spectrum as the p x p
    ``GᵀG / n``, which is never formed). ``trace``, ``eigmax``, ``energy_r8``, ``energy_r16`` and
    ``effective_rank`` (smallest k with energy ≥ 0.9) are those of the whole spectrum; ``eigmin`` and
    ``cond = eigmax / eigmin`` are over its **nonzero part** (the ``rank`` eigenvalues above the
    numerical-rank tolerance of ``gram.nonzero_part``), because F has at most n nonzero eigenvalues
    and p ≫ n: over all p eigenvalues, eigmin would be 0 and cond infinite for every block.
    Non-finite values (a block whose gradient is zero) are null. The first ``max_examples`` examples
    with a target are used, pooled over the run's tasks.
    """

    name = "fisher.spectrum"
    version = "1"
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
    }

    @classmethod
    def artifact_requests(cls, params: Any, view: ModelView) -> dict[str, Any]:
        """Every trainable parameter's scores, with labels drawn from the model and observed."""
        return {ARTIFACT: REQUEST}

    @classmethod
    def skip_reason(cls, params: SpectrumParams, view: ModelView, data: PreparedData | None) -> str | None:
        try:
            head_blocks(view, 0)
        except (NotImplementedError, ValueError) as exc:
            return f"fisher.spectrum needs the model's per-head weights: {exc}"
        return None

    @classmethod
    def cost(cls, params: SpectrumParams, view: ModelView, shape: RunShape) -> Cost:
        blocks = all_blocks(view)
        union, _ = _columns(view, blocks)
        n = capacity(params, shape)
        sizes = [b.size for row in blocks for b in row]
        index_bytes = 8 * (union.numel() + 2 * sum(sizes))  # int64 entries of each block and their positions
        return Cost(state_bytes=n * union.numel() * view.dtype_bytes + index_bytes,
                    flops=float(sum(2 * n * n * p + 10 * n**3 for p in sizes)))

    def setup(self) -> None:
        self.blocks = all_blocks(self.view)
        self.columns, self.positions = _columns(self.view, self.blocks)
        self.grads = torch.zeros(capacity(self.params, self.shape), self.columns.numel(),
                                 dtype=next(self.view.model.parameters()).dtype)
        self.filled = 0

    def update(self, step: Step) -> None:
        value = FisherGrads.of(step[ARTIFACT])
        grads = value.true if self.params.fisher == "true" else value.empirical
        rows = (value.n_targets > 0).nonzero().flatten()[: self.grads.shape[0] - self.filled]
        self.grads[self.filled:self.filled + rows.numel()] = grads[rows.to(grads.device)][:, self.columns].cpu()
        self.filled += rows.numel()

    def finalize(self) -> dict[str, Any]:
        n = self.filled
        if n == 0:
            raise ValueError("fisher.spectrum saw no example with a loss target: give it sequences of at least "
                             "two tokens (causal) or with a mask token (masked LM)")
        eps = torch.finfo(self.grads.dtype).eps
        stats: dict[str, list[list[float | None]]] = {k: [] for k in KEYS}
        spectra = torch.zeros(self.view.n_layers, len(self.blocks[0]), n, dtype=torch.float64)
        for layer, (row, positions) in enumerate(zip(self.blocks, self.positions, strict=True)):
            for k in KEYS:
                stats[k].append([])
            for b, (block, pos) in enumerate(zip(row, positions, strict=True)):
                eig = gram_eigenvalues(self.grads[:n, pos])
                spectra[layer, b] = eig
                part = nonzero_part(eig, n, block.size, eps)
                summary = {**spectral_summary(part), "rank": float(part.numel() if float(eig[0]) > 0 else 0)}
                for k in KEYS:
                    stats[k][layer].append(finite_or_none(summary[k]))
        out: dict[str, Any] = {}
        for k in KEYS:
            out[f"attn_{k}"] = HeadValue(values=[r[:-1] for r in stats[k]])
            out[f"mlp_{k}"] = LayerValue(values=[r[-1] for r in stats[k]], axis="block")
        out["attn_eigenvalues"], out["mlp_eigenvalues"] = spectra[:, :-1], spectra[:, -1]
        out["n_examples"] = ScalarValue(value=float(n), n=n)
        out["head_params"], out["mlp_params"] = float(self.blocks[0][0].size), float(self.blocks[0][-1].size)
        return out
