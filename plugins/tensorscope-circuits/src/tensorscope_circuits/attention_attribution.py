"""circuits.attention_attribution: attention x gradient of the run's loss, per head."""

from __future__ import annotations

from typing import Any

import torch

from tensorscope_core.plugin_api import (
    Cost,
    HeadValue,
    Interpretation,
    Metric,
    MetricResult,
    ModelView,
    NoParams,
    NotApplicable,
    PreparedData,
    RunShape,
    ScalarValue,
    Step,
    TableValue,
)

from .attn_grad import ATTN_X_GRAD


def ranks(values: torch.Tensor) -> torch.Tensor:
    """1 for the largest entry, 2 for the next, ... (ties broken by position, row-major)."""
    order = torch.argsort(-values.flatten(), stable=True)
    out = torch.empty_like(order)
    out[order] = torch.arange(1, order.numel() + 1)
    return out.view(values.shape)


class AttentionAttribution(Metric):
    """Attention x gradient (the one-step form of Hao et al. 2021's self-attention attribution):
    per layer and query head h, ``attribution[l, h] = sum over examples, queries q and keys k of
    A_h[q, k] * dL/dA_h[q, k]``, where A are the attention probabilities (treated as free inputs of
    the value product, not through the softmax) and L is the run's loss: the mean token loss over
    every loss target of the run (next tokens; a masked LM's seeded masked tokens), the loss of
    ``basic.loss``. A sum over positions and examples of the gradient of a mean, so the total over
    heads is the first-order change of the loss when all attention is scaled down:
    L((1 - eps) A) = L(A) - eps * total + O(eps^2). ``abs_attribution`` sums |A * dL/dA| element-wise
    (how much attribution mass a head carries, whatever its sign); ``share`` is a head's
    ``abs_attribution`` over the sum of all heads'; ``rank`` orders heads by ``abs_attribution``
    (1 = largest). Grouped-query models: attention probabilities are per query head (the key/value
    heads are repeated before the product), so every value is per query head; heads of one group
    share their keys and values but not their attribution. Read from the run's shared backward
    (no pass of its own). Zero-ablating a head scales its attention by 0, so to first order
    ``circuits.ablation``'s ``head_zero`` is -``attribution``: declared in ``derived_from`` so that
    correlation discovery does not report the pair.
    """

    name = "circuits.attention_attribution"
    supports_dispatch = True  # reads the shared pass's attention and its gradient only
    version = "1"
    summary = "attention x gradient of the loss per head: signed, absolute, rank and share"
    Params = NoParams
    artifacts = (ATTN_X_GRAD,)
    derived_from = ("circuits.ablation.head_zero",)
    fields = {
        "attribution": "layer x head: sum of A * dL/dA over examples, queries and keys (nats)",
        "abs_attribution": "layer x head: sum of |A * dL/dA| (nats)",
        "share": "layer x head: abs_attribution / its sum over all heads",
        "rank": "layer x head: rank by abs_attribution (1 = largest)",
        "total": "sum of attribution over heads: -dL/d eps of L((1 - eps) A) at eps = 0 (nats)",
        "total_abs": "sum of abs_attribution over heads (nats)",
        "top": "table of heads by rank: layer, head, attribution, abs_attribution, share",
    }

    @classmethod
    def skip_reason(cls, params: NoParams, view: ModelView, data: PreparedData | None) -> str | None:
        return None if view.attn else f"the adapter of {view.name} maps no attention modules"

    @classmethod
    def cost(cls, params: NoParams, view: ModelView, shape: RunShape) -> Cost:
        heads = view.n_layers * view.n_heads
        return Cost(state_bytes=2 * heads * 8, flops=3.0 * shape.n_sequences * heads * shape.seq_len ** 2)

    def setup(self) -> None:
        grid = (self.view.n_layers, self.view.n_heads)
        self.signed = torch.zeros(grid, dtype=torch.float64)
        self.absolute = torch.zeros(grid, dtype=torch.float64)
        self.n_targets = 0

    def update(self, step: Step) -> None:
        # The shared backward differentiates the batch's mean loss: n_b of it is the batch's summed
        # loss, whose gradient is the batch's share of the run's summed loss.
        n_b = step.targets.n_targets
        for layer, sums in enumerate(step[ATTN_X_GRAD]):
            self.signed[layer] += sums[..., 0].sum(dim=0).cpu() * n_b
            self.absolute[layer] += sums[..., 1].sum(dim=0).cpu() * n_b
        self.n_targets += n_b

    def finalize(self) -> dict[str, Any]:
        if self.n_targets == 0:
            raise NotApplicable("the run has no loss targets, so the loss has no gradient",
                                "give causal models sequences of 2+ tokens, masked LMs a tokenizer with a mask token")
        signed, absolute = self.signed / self.n_targets, self.absolute / self.n_targets
        share = absolute / absolute.sum()
        rank = ranks(absolute)
        order = torch.argsort(rank.flatten())
        n_heads = self.view.n_heads
        top = [[int(i) // n_heads, int(i) % n_heads, float(signed.flatten()[i]), float(absolute.flatten()[i]),
                float(share.flatten()[i])] for i in order]
        return {
            "attribution": HeadValue(values=signed.tolist()),
            "abs_attribution": HeadValue(values=absolute.tolist()),
            "share": HeadValue(values=share.tolist()),
            "rank": HeadValue(values=rank.double().tolist()),
            "total": ScalarValue(value=float(signed.sum()), n=self.n_targets, unit="nats"),
            "total_abs": ScalarValue(value=float(absolute.sum()), n=self.n_targets, unit="nats"),
            "top": TableValue(columns=["layer", "head", "attribution", "abs_attribution", "share"], rows=top),
        }

    @classmethod
    def interpret(cls, result: MetricResult) -> list[Interpretation]:
        rows = result.values["top"].rows  # type: ignore[union-attr]
        if not rows:
            return []
        layer, head, _, _, share = rows[0]
        return [Interpretation(level="hotspot", text=f"largest attention attribution ({share:.0%} of the total)",
                               where=f"layer {layer} head {head}")]
