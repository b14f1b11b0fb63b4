"""circuits.attention_entropy: how spread out each head's attention is on the run's data."""

from __future__ import annotations

from typing import Any

import torch

from tensorscope_core.plugin_api import Cost, Metric, ModelView, NoParams, RunShape, Step

from .headstats import ratio_grid
from .patterns import entropy_sums


class AttentionEntropy(Metric):
    """Per layer x head, the Shannon entropy (nats) of the attention rows on the run's data.

    For query q with attention A_q over its n_q visible real keys (keys k <= q under a causal
    mask, every real token for an encoder; padding is excluded), H_q = -sum_k A_qk ln A_qk
    (0 ln 0 = 0), and the normalised entropy is H_q / ln(n_q): 1 for uniform attention over the
    visible keys, 0 for one-hot rows. Without padding, n_q = q + 1 (0-indexed) for causal
    models and T (the sequence length) for encoders. Queries with n_q < 2 (the first token of a
    causal model) have no choice and are left out. Values are token-weighted means over every
    counted query of every sequence; the CIs are percentile-bootstrap intervals resampling
    sequences. Masked-LM encoders are measured on the core's masked input.
    """

    name = "circuits.attention_entropy"
    supports_dispatch = True  # reads the shared pass's activations / outputs only
    version = "1"
    summary = "per-head mean attention entropy and normalised entropy with bootstrap CIs"
    Params = NoParams
    artifacts = ("attn_pattern",)
    fields = {
        "entropy": "layer x head: mean H_q over counted queries (nats)",
        "entropy_ci_low": "lower end of the 95% bootstrap CI of entropy (sequences resampled)",
        "entropy_ci_high": "upper end of that CI",
        "normalised": "layer x head: mean H_q / ln(n_q), in [0, 1]",
        "normalised_ci_low": "lower end of the 95% bootstrap CI of normalised",
        "normalised_ci_high": "upper end of that CI",
    }

    @classmethod
    def cost(cls, params: NoParams, view: ModelView, shape: RunShape) -> Cost:
        per_seq = 2 * view.n_layers * view.n_heads + 1  # two float64 sums per head, one count
        flops = 4.0 * shape.n_sequences * view.n_layers * view.n_heads * shape.seq_len ** 2
        return Cost(state_bytes=8 * shape.n_sequences * per_seq, flops=flops)

    def setup(self) -> None:
        n, layers, heads = self.shape.n_sequences, self.view.n_layers, self.view.n_heads
        self.entropy = torch.zeros(n, layers, heads, dtype=torch.float64)
        self.normalised = torch.zeros(n, layers, heads, dtype=torch.float64)
        self.count = torch.zeros(n, dtype=torch.float64)
        self.filled = 0

    def update(self, step: Step) -> None:
        mask = step.batch.attention_mask
        rows = slice(self.filled, self.filled + mask.shape[0])
        for layer, attn in enumerate(step["attn_pattern"]):
            sums = entropy_sums(attn, mask, self.view.causal)
            self.entropy[rows, layer] = sums.entropy.cpu()
            self.normalised[rows, layer] = sums.normalised.cpu()
        self.count[rows] = sums.count.cpu()
        self.filled += mask.shape[0]

    def finalize(self) -> dict[str, Any]:
        count = self.count[:self.filled].numpy()
        seed = self.shape.seed
        return {**ratio_grid(self.entropy[:self.filled].numpy(), count, seed=seed, name="entropy"),
                **ratio_grid(self.normalised[:self.filled].numpy(), count, seed=seed, name="normalised")}
