"""circuits.attention_flow: attention rollout (Abnar & Zuidema, 2020) over the shared attention patterns."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field

from tensorscope_core.plugin_api import Cost, Metric, ModelView, Params, RunShape, Step

#: weight of the identity (the residual connection) in each layer's mixing matrix
RESIDUAL_WEIGHT = 0.5


def rollout(patterns: Sequence[torch.Tensor], attention_mask: torch.Tensor) -> torch.Tensor:
    """Attention rollout [batch, seq, seq] (float64): row i is output position i, column j source token j.

    Per layer: A = mean over heads of the pattern, restricted to real tokens;
    M = 0.5 A + 0.5 I, each row divided by its sum; rollout = M_{L-1} ... M_1 M_0.
    Rows and columns of padding are the identity's (they carry nothing into real tokens).
    """
    real = attention_mask.bool()
    pair = (real[:, :, None] & real[:, None, :]).double()
    eye = torch.eye(real.shape[1], dtype=torch.float64, device=real.device)
    flow = eye.expand(real.shape[0], -1, -1)
    for pattern in patterns:
        mixed = RESIDUAL_WEIGHT * pattern.double().mean(dim=1) * pair + (1 - RESIDUAL_WEIGHT) * eye
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        flow = mixed @ flow
    return flow


class AttentionFlowParams(Params):
    per_sequence: bool = Field(False, description="also keep every sequence's full rollout [n_sequences, seq, seq]")


class AttentionFlow(Metric):
    """Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", 2020):
    how much each source token flows into each output position through all layers.

    Exact choice: per layer the attention pattern is averaged over all query heads (with
    grouped-query attention every query head counts once), restricted to the real tokens of
    the sequence, mixed with the residual connection as ``M = 0.5 A + 0.5 I`` and
    row-normalised (rows sum to 1); the rollout is the product ``M_{L-1} ... M_0``, so entry
    (i, j) is the relevance of source token j to the output at position i, and every row of
    real tokens sums to 1. Under a causal mask the rollout is lower triangular.

    ``rollout_mean`` [seq, seq]: entry (i, j) averaged over the sequences in which positions i
    and j are both real (NaN where none is). ``last_token`` [n_sequences, seq]: the row of each
    sequence's last real token (NaN on padding). ``rollout`` [n_sequences, seq, seq] (with
    ``per_sequence=True``): every sequence's rollout, NaN outside its real tokens.
    """

    name = "circuits.attention_flow"
    supports_dispatch = True  # reads the shared pass's activations / outputs only
    version = "1"
    summary = "attention rollout: relevance of every source token to every output position"
    Params = AttentionFlowParams
    artifacts = ("attn_pattern",)
    fields = {"rollout_mean": "mean rollout over sequences [seq, seq] (row: output position, column: source)",
              "last_token": "rollout row of each sequence's last real token [n_sequences, seq]",
              "rollout": "every sequence's rollout [n_sequences, seq, seq] (per_sequence=True only)"}

    @classmethod
    def cost(cls, params: AttentionFlowParams, view: ModelView, shape: RunShape) -> Cost:
        n, t = shape.n_sequences, shape.seq_len
        per_sequence = n * t * t if params.per_sequence else 0
        flops = 2.0 * n * view.n_layers * t ** 3
        return Cost(state_bytes=8 * (2 * t * t + n * t + per_sequence), flops=flops)

    def setup(self) -> None:
        n, t = self.shape.n_sequences, self.shape.seq_len
        self.sums = torch.zeros(t, t, dtype=torch.float64)
        self.counts = torch.zeros(t, t, dtype=torch.float64)
        self.last = torch.full((n, t), math.nan, dtype=torch.float64)
        self.full = torch.full((n, t, t) if self.params.per_sequence else (0,), math.nan, dtype=torch.float64)
        self.filled = 0

    def update(self, step: Step) -> None:
        mask = step.batch.attention_mask
        flow = rollout(step["attn_pattern"], mask).cpu()
        real = mask.bool().cpu()
        pair = real[:, :, None] & real[:, None, :]
        s = flow.shape[1]
        self.sums[:s, :s] += (flow * pair).sum(0)
        self.counts[:s, :s] += pair.sum(0)
        for i, n_real in enumerate(real.sum(1).tolist()):
            self.last[self.filled + i, :n_real] = flow[i, n_real - 1, :n_real]
            if self.params.per_sequence:
                self.full[self.filled + i, :n_real, :n_real] = flow[i, :n_real, :n_real]
        self.filled += flow.shape[0]

    def finalize(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rollout_mean": self.sums / self.counts, "last_token": self.last[:self.filled]}
        if self.params.per_sequence:
            out["rollout"] = self.full[:self.filled]
        return out
