"""circuits.attention_drift: how far each head's attention pattern moves between checkpoints."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tensorscope_core.plugin_api import (
    Batch,
    Cost,
    HeadValue,
    LossTargets,
    MetricResult,
    ModelSetMetric,
    ModelView,
    RunShape,
    ScalarValue,
    TableValue,
    js_divergence_bits,
)


def counted_queries(mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """[batch, seq] real queries with at least 2 visible real keys (the others have no choice)."""
    real = mask.bool()
    visible = real.long().cumsum(1) if causal else real.long().sum(1, keepdim=True).expand_as(real)
    return real & (visible >= 2)


@torch.no_grad()
def attention_probs(view: ModelView, batch: Batch, targets: LossTargets) -> list[torch.Tensor]:
    """Attention probabilities per layer [batch, heads, seq, seq] on the run's model input (eager kernel)."""
    out = view.model(
        input_ids=targets.model_input, attention_mask=batch.attention_mask, output_attentions=True, use_cache=False
    )
    attentions = getattr(out, "attentions", None)
    if not attentions or attentions[0] is None:
        raise RuntimeError(f"{view.name} returned no attention weights: load it with attn_implementation='eager'")
    return [a.cpu() for a in attentions]


class AttentionDrift(ModelSetMetric):
    """Mean Jensen-Shannon divergence (bits) between the attention rows of each head of
    consecutive models of the run, in the order given (checkpoints: earlier first), or of every
    model and the base when the run has one. For every batch of the run and every query with at
    least 2 visible real keys (keys <= q under a causal mask; padding excluded), JSD(A_q, A'_q)
    in [0, 1] bits; averaged over those queries per layer x head. 0 for identical models; a
    head that moves from uniform to one-hot over the q + 1 keys of query q has
    JSD = 1/2 [log2(2n/(n+1)) + (1/n) log2(2/(n+1)) + (n-1)/n] with n = q + 1.
    Each member makes one forward per batch with ``output_attentions`` (``replay_forward``).
    """

    name = "circuits.attention_drift"
    min_models = 2  # a comparison: the core skips a smaller set with the fix
    version = "1"
    summary = "mean JSD of attention rows per head between consecutive checkpoints (a model-set metric)"
    fields = {
        "drift": "[n_pairs, n_layers, n_heads] mean row JSD (bits) of each pair",
        "last": "layer x head drift of the last pair",
        "pairs": "table model_a, model_b, layer, head, jsd",
        "max_drift": "largest head drift over pairs",
    }

    @classmethod
    def uses_data(cls, params: Any) -> bool:
        return True

    @classmethod
    def own_passes(
        cls, params: Any, view: ModelView, shape: RunShape, members: Sequence[str], base_name: str | None
    ) -> dict[str, int]:
        return {"replay_forward": shape.n_batches * len(members)}

    @classmethod
    def cost(cls, params: Any, view: ModelView, shape: RunShape) -> Cost:
        return Cost(state_bytes=0)

    @classmethod
    def set_skip_reason(cls, params: Any, views: Mapping[str, ModelView], base_name: str | None) -> str | None:
        shapes = {(v.n_layers, v.n_heads) for v in views.values()}
        if len(shapes) > 1:
            return f"{cls.name} compares the same heads: the models have different layers x heads {sorted(shapes)}"
        return None

    def _pairs(self, names: list[str]) -> list[tuple[str, str]]:
        if self.base_name is not None:
            return [(self.base_name, n) for n in names if n != self.base_name]
        return list(zip(names, names[1:], strict=False))

    def compute_set(
        self, views: Mapping[str, ModelView], results: Mapping[str, Mapping[str, MetricResult]]
    ) -> dict[str, Any]:
        names = list(views)
        pairs = self._pairs(names)
        first = views[names[0]]
        sums = torch.zeros(len(pairs), first.n_layers, first.n_heads, dtype=torch.float64)
        counted = 0.0
        for batches in zip(*(self.data[n].batches() for n in names), strict=True):
            if any(not torch.equal(b.input_ids, batches[0].input_ids) for b in batches):
                raise ValueError(
                    "the models' batches differ (another tokenizer?): attention rows are compared "
                    "token by token on the same input"
                )
            batch = batches[0]
            probs = {
                n: attention_probs(views[n], b, self.loss_targets(views[n], b))
                for n, b in zip(names, batches, strict=True)
            }
            keep = counted_queries(batch.attention_mask, first.causal).cpu()
            weight = keep.double()[:, None, :]  # [batch, 1, seq]
            for i, (a, b) in enumerate(pairs):
                for layer, (pa, pb) in enumerate(zip(probs[a], probs[b], strict=True)):
                    sums[i, layer] += (js_divergence_bits(pa, pb) * weight).sum((0, 2))
            counted += float(keep.sum())
        if counted == 0:
            raise ValueError("no query with at least 2 visible keys: sequences of 2+ real tokens are needed")
        drift = sums / counted
        rows = [
            [a, b, layer, head, float(drift[i, layer, head])]
            for i, (a, b) in enumerate(pairs)
            for layer in range(drift.shape[1])
            for head in range(drift.shape[2])
        ]
        return {
            "drift": drift,
            "last": HeadValue(values=drift[-1].tolist()),
            "pairs": TableValue(columns=["model_a", "model_b", "layer", "head", "jsd"], rows=rows),
            "max_drift": ScalarValue(value=float(drift.max()), unit="bits"),
        }
