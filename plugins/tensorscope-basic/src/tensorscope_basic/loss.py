"""basic.loss: token-weighted cross-entropy and perplexity with a bootstrap CI over sequences."""

from __future__ import annotations

import math

import torch

from tensorscope_core.plugin_api import (
    Cost,
    Metric,
    ModelView,
    NoParams,
    RunShape,
    ScalarValue,
    Step,
    bootstrap_ratio_ci,
)


class Loss(Metric):
    """Mean next-token cross-entropy (nats per target token) over all target tokens.

    Causal models: position t predicts token t+1, padding excluded. Masked-LM encoders:
    the core's seeded 15% mask. Perplexity is exp(loss). The 95% CI is a percentile
    bootstrap over sequences (the sequence is the resampled unit, tokens weighted).
    With named tasks, ``loss/<task>`` is reported per task as well.

    ``loss`` keeps each sequence's mean token loss as its ``samples`` (in data order), so
    comparisons across models test differences paired by sequence.
    """

    name = "basic.loss"
    supports_dispatch = True  # reads the shared pass's activations / outputs only
    version = "2"
    summary = "per-token loss and perplexity with a bootstrap CI over sequences"
    Params = NoParams
    artifacts = ("token_loss",)
    fields = {"loss": "mean cross-entropy per target token (nats)", "perplexity": "exp(loss)",
              "loss/<task>": "the same per named task"}

    def setup(self) -> None:
        n = self.shape.n_sequences
        self.seq_loss = torch.zeros(n, dtype=torch.float64)
        self.seq_tokens = torch.zeros(n, dtype=torch.float64)
        self.seq_task: list[str | None] = []
        self.filled = 0

    @classmethod
    def cost(cls, params: NoParams, view: ModelView, shape: RunShape) -> Cost:
        return Cost(state_bytes=2 * 8 * shape.n_sequences)

    def update(self, step: Step) -> None:
        loss = step["token_loss"].double()
        mask = step.target_mask.double()
        rows = loss.shape[0]
        self.seq_loss[self.filled:self.filled + rows] = (loss * mask).sum(dim=1).cpu()
        self.seq_tokens[self.filled:self.filled + rows] = mask.sum(dim=1).cpu()
        self.seq_task += [step.task] * rows
        self.filled += rows

    def _scalar(self, keep: torch.Tensor) -> tuple[ScalarValue, ScalarValue]:
        loss_sum, tokens = self.seq_loss[keep], self.seq_tokens[keep]
        value = float(loss_sum.sum() / tokens.sum())
        low, high = bootstrap_ratio_ci(loss_sum.tolist(), tokens.tolist(), seed=self.shape.seed)
        n = int(tokens.sum())
        samples = (loss_sum / tokens).tolist()
        return (ScalarValue(value=value, ci_low=low, ci_high=high, n=n, unit="nats/token", samples=samples),
                ScalarValue(value=math.exp(value), ci_low=math.exp(low), ci_high=math.exp(high), n=n))

    def finalize(self) -> dict[str, ScalarValue]:
        used = torch.zeros(len(self.seq_loss), dtype=torch.bool)
        used[:self.filled] = self.seq_tokens[:self.filled] > 0
        loss, ppl = self._scalar(used)
        out = {"loss": loss, "perplexity": ppl}
        tasks = sorted({t for t in self.seq_task if t is not None})
        for task in tasks:
            mask = used.clone()
            mask[:self.filled] &= torch.tensor([t == task for t in self.seq_task])
            out[f"loss/{task}"] = self._scalar(mask)[0]
        return out
