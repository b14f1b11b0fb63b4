"""geometry.similarity_terms: the per-batch Gram and correlation matrices that CKA and RSA are computed from.

One metric captures them once per model, so ``geometry.cka``, ``geometry.rsa`` and the
cross-model ``geometry.cka_across`` / ``geometry.rsa_across`` all read the same examples
(the cross-model metrics need every model's matrices of the same batches).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from tensorscope_core.plugin_api import Cost, Metric, ModelView, Params, PreparedData, RunShape, SeriesValue, Step

from .kernels import centred_gram, correlation_matrix

TERMS = "geometry.similarity_terms"


class TermsParams(Params):
    unit: Literal["token", "sequence"] = Field(
        "token", description="an example is one real token ('token') or the mean of a sequence's real tokens "
                             "('sequence': use it for models with different tokenizers)")
    examples_per_batch: int = Field(
        128, ge=4, description="examples kept per batch, drawn without replacement with a seed of the run's seed "
                               "and the batch index (the same on every model); memory grows with its square")


class SimilarityTerms(Metric):
    """Per batch b and residual-stream entry l (``resid``, n_layers + 1 entries), over a seeded
    subset of at most ``examples_per_batch`` examples of the batch (padding excluded):

    - ``grams[b, l]``: the mean-centred linear Gram matrix H X X^T H (float64);
    - ``correlations[b, l]``: the Pearson correlation between examples over the d_model
      features (RSA's RDM is 1 minus it);
    - ``examples[b]``: what each example is (the token id, or the sequence's index in the
      data), -1 past the batch's ``sizes[b]`` examples; the cross-model metrics check them.

    Examples are chosen by ``torch.randperm`` seeded with (run seed, batch index), so models
    run on the same data with the same seed hold the same examples.
    """

    name = TERMS
    supports_dispatch = True  # reads the shared pass's activations / outputs only
    version = "1"
    summary = "per-batch centred Gram and correlation matrices of the residual stream (read by CKA / RSA)"
    Params = TermsParams
    artifacts = ("resid",)
    fields = {"grams": "[n_batches, n_layers + 1, m, m] centred Gram matrices, zero past sizes[b]",
              "correlations": "[n_batches, n_layers + 1, m, m] Pearson correlations between examples",
              "examples": "[n_batches, m] token id (unit token) or sequence index (unit sequence), -1 unused",
              "sizes": "examples held per batch"}

    @classmethod
    def skip_reason(cls, params: TermsParams, view: ModelView, data: PreparedData | None) -> str | None:
        if data is not None and _capacity(params, data.batch_size, data.max_seq_len) < 4:
            return (f"unit='{params.unit}' gives fewer than 4 examples per batch (batch_size {data.batch_size}): "
                    "the unbiased HSIC needs 4; raise batch_size or use unit='token'")
        return None

    @classmethod
    def cost(cls, params: TermsParams, view: ModelView, shape: RunShape) -> Cost:
        m = _capacity(params, shape.batch_size, shape.seq_len)
        layers = view.n_layers + 1
        state = shape.n_batches * (2 * layers * m * m * 8 + m * 8 + 8)
        return Cost(state_bytes=state, flops=4.0 * shape.n_batches * layers * m * m * view.d_model)

    def setup(self) -> None:
        m = _capacity(self.params, self.shape.batch_size, self.shape.seq_len)
        shape = (self.shape.n_batches, self.view.n_layers + 1, m, m)
        self.grams = torch.zeros(shape, dtype=torch.float64)
        self.correlations = torch.zeros(shape, dtype=torch.float64)
        self.examples = torch.full((self.shape.n_batches, m), -1, dtype=torch.long)
        self.sizes = torch.zeros(self.shape.n_batches, dtype=torch.long)
        self.filled = 0
        self.sequences_seen = 0

    def update(self, step: Step) -> None:
        mask = step.batch.attention_mask.bool()
        gen = torch.Generator().manual_seed(self.shape.seed * 1_000_003 + step.batch.index)
        if self.params.unit == "token":
            rows, cols = mask.nonzero(as_tuple=True)
            ids = step.batch.input_ids[rows, cols]
        else:
            rows = mask.any(1).nonzero().flatten()
            ids = torch.arange(len(rows)) + self.sequences_seen
        self.sequences_seen += int(mask.shape[0])
        m = min(self.params.examples_per_batch, len(ids))
        pick = torch.randperm(len(ids), generator=gen)[:m].sort().values
        b = self.filled
        for layer, acts in enumerate(step["resid"]):
            acts = acts.detach().cpu().double()
            if self.params.unit == "token":
                x = acts[rows[pick], cols[pick]]
            else:
                weights = mask.double()
                x = ((acts * weights.unsqueeze(-1)).sum(1) / weights.sum(1, keepdim=True).clamp_min(1))[rows[pick]]
            self.grams[b, layer, :m, :m] = centred_gram(x)
            self.correlations[b, layer, :m, :m] = correlation_matrix(x)
        self.examples[b, :m] = ids[pick]
        self.sizes[b] = m
        self.filled += 1

    def finalize(self) -> dict[str, Any]:
        if self.filled == 0:
            raise ValueError("no batches: CKA and RSA need data")
        b = self.filled
        return {"grams": self.grams[:b], "correlations": self.correlations[:b], "examples": self.examples[:b],
                "sizes": SeriesValue(values=self.sizes[:b].tolist(), index_name="batch")}


def _capacity(params: TermsParams, batch_size: int, seq_len: int) -> int:
    limit = batch_size * seq_len if params.unit == "token" else batch_size
    return min(params.examples_per_batch, limit)
