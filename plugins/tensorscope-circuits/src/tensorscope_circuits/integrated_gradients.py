"""circuits.integrated_gradients: which input tokens the loss (or a chosen logit) is due to."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from tensorscope_core.plugin_api import (
    Cost,
    DataError,
    Metric,
    ModelView,
    Params,
    PreparedData,
    Rung,
    RunShape,
    ScalarValue,
    Step,
    act_bytes,
    hook_free_view,
)

from .ig import Objective, Rule, integrated_gradients, mean_token_loss, scored_extent
from .interventions import logits_of
from .tokens import token_id


class IGParams(Params):
    target: Literal["loss", "logit"] = Field(
        "loss", description="F: 'loss' = the sequence's mean token loss over its targets; 'logit' = one logit")
    token: int | str | None = Field(
        None, description="logit target: token id or single-token text; None = the model's top prediction")
    position: int = Field(-1, description="logit target: position; negative counts back from the last real token")
    baseline: Literal["zero", "pad", "mask"] = Field(
        "zero", description="x': the zero embedding, or the pad / mask token's embedding at every real position")
    steps: int = Field(50, ge=1, description="quadrature nodes along the path")
    rule: Rule = Field("gausslegendre", description="quadrature rule (Captum's names)")
    chunk: int = Field(10, ge=1, description="path nodes per forward/backward (bounds the memory)")

    @model_validator(mode="after")
    def _enough_steps(self) -> IGParams:
        if self.rule == "riemann_trapezoid" and self.steps < 2:
            raise ValueError(f"rule riemann_trapezoid needs at least 2 steps, got {self.steps}")
        return self


class IntegratedGradients(Metric):
    """Integrated gradients (Sundararajan, Taly & Yan, 2017) of F with respect to the token
    embeddings (the output of the embedding lookup, before position embeddings are added:
    what Captum's ``LayerIntegratedGradients`` on the embedding layer attributes), from a
    baseline x' (zero, or the pad or mask token's embedding at every real token) to the input x:

        IG_t = (x_t - x'_t) . sum_k w_k grad_x_t F(x' + a_k (x - x')),  summed over the embedding,

    with the nodes a_k and weights w_k of ``rule`` (default Gauss-Legendre, as Captum). F per
    sequence: ``target='loss'``: the mean token loss over its targets (the core's target
    mask: next tokens, or the masked tokens of an encoder, on the input the shared pass sees);
    ``target='logit'``: the logit of ``token`` (None: the model's top prediction) at ``position``.
    Padding keeps its embedding (no attribution, NaN in ``attributions``). For the loss, F(x)
    is the shared pass's ``token_loss`` (no forward of the metric's own). In a causal model the
    positions after the last one F reads (for the loss, the final column, which has no target)
    are left out of every forward: they cannot reach F, so their attribution is exactly 0.

    Completeness: sum_t IG_t = F(x) - F(x') up to the quadrature error, which is reported:
    ``completeness_error`` = max over sequences of |sum_t IG_t - (F(x) - F(x'))|, and
    ``completeness_relative`` the same divided by |F(x) - F(x')|. It is the quadrature error,
    which shrinks as ``steps`` grows, fast where F is smooth along the path: on the tiny GPT-2
    test model 50 Gauss-Legendre steps give a relative error below 1e-3. A zero baseline in a
    model without position embeddings (LLaMA, GPT-NeoX) starts the path where the first norm is
    singular (norm(a x) jumps near a = 0), and convergence is slow (tiny LLaMA: 0.5 at 50 steps,
    below 1e-2 at 200). Read ``completeness_relative`` before trusting the attributions.
    Memory: ``chunk`` nodes run per forward/backward, so the transient working memory is one
    backward over chunk x batch_size sequences; ``chunk`` does not change the values.
    """

    name = "circuits.integrated_gradients"
    supports_dispatch = True  # replays forwards and backwards to the input embeddings; reads the baseline onloaded
    version = "1"
    summary = "integrated-gradients attribution of the loss or a logit to the input tokens, with completeness"
    Params = IGParams
    artifacts = ("token_loss",)
    fields = {"attributions": "IG per token [n_sequences, seq] (NaN on padding)",
              "at_input": "F(x) per sequence", "at_baseline": "F(x') per sequence",
              "completeness_error": "max_seq |sum_t IG_t - (F(x) - F(x'))|",
              "completeness_relative": "max_seq |sum_t IG_t - (F(x) - F(x'))| / |F(x) - F(x')|"}

    @classmethod
    def skip_reason(cls, params: IGParams, view: ModelView, data: PreparedData | None) -> str | None:
        if params.baseline == "mask" and view.mask_token_id is None:
            return "baseline 'mask' needs the tokenizer's mask token: this model has none (use 'zero' or 'pad')"
        return None

    @classmethod
    def cost(cls, params: IGParams, view: ModelView, shape: RunShape) -> Cost:
        n, t = shape.n_sequences, shape.seq_len
        flops = 6.0 * view.n_params * n * t * (params.steps + 2)  # a forward and a backward per node
        rows = min(params.chunk, params.steps) * shape.batch_size  # one forward+backward of the path
        # whose graph, on a dispatched model, keeps every offloaded weight loaded for it until the backward
        return Cost(state_bytes=8 * (n * t + 2 * n), flops=flops,
                    transient_bytes=act_bytes(view, rows, t) + view.graph_weight_bytes([view.model]))

    @classmethod
    def ladder(cls, params: IGParams, view: ModelView, shape: RunShape) -> Sequence[Rung]:
        """Fewer path nodes per forward and backward: the same attributions from more, smaller calls."""
        candidates = [Rung(f"chunk-{c}", params.model_copy(update={"chunk": c}),
                           f"exact (the same attributions): {c} path node(s) per forward and backward, "
                           f"{-(-params.steps // c)} calls per batch instead of {-(-params.steps // params.chunk)}")
                      for c in (4, 1) if c < params.chunk]
        return cls.cheaper_rungs(params, view, shape, candidates)

    @classmethod
    def own_passes(cls, params: IGParams, view: ModelView, shape: RunShape) -> dict[str, int]:
        """Per batch of the run, in ``update`` (on the hook-free twin): ceil(steps / chunk)
        forward+backward calls along the path; one forward without gradients for F at the ends
        (the baseline alone for the loss, input and baseline together for a logit); one more
        for the top prediction when ``target='logit'`` and ``token`` is None. None when the
        named token is not a single token of the vocabulary (the first batch fails before any
        call). Planned count: a ``position`` outside some sequence fails that batch."""
        logit = params.target == "logit"
        if logit and params.token is not None:
            try:
                token_id(view, params.token, "token")
            except DataError:
                return {}
        n = len(shape.batches)
        return {"replay_forward": n * (1 + (logit and params.token is None)),
                "replay_backward": n * -(-params.steps // params.chunk)}

    def setup(self) -> None:
        n, t = self.shape.n_sequences, self.shape.seq_len
        self.attributions = torch.full((n, t), math.nan, dtype=torch.float64)
        self.ends = torch.zeros(2, n, dtype=torch.float64)
        self.filled = 0

    def _baseline(self, input_ids: torch.Tensor) -> torch.Tensor:
        embed = self.view.embed
        shape = (*input_ids.shape, self.view.d_model)
        if self.params.baseline == "zero":
            return torch.zeros(shape, dtype=embed.weight.dtype, device=input_ids.device)
        row = self.view.pad_token_id if self.params.baseline == "pad" else self.view.mask_token_id
        assert row is not None
        with self.view.onloaded(embed):  # a dispatched model's embedding may be offloaded
            return embed.weight[row].detach().clone().expand(shape)

    def _objective(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_ids: torch.Tensor,
                   target_mask: torch.Tensor) -> tuple[Objective, int | None]:
        """F, and how many leading positions' logits it reads (None: all)."""
        if self.params.target == "loss":
            return mean_token_loss(target_ids, target_mask), scored_extent(target_mask)
        lengths = attention_mask.sum(-1)
        p = self.params.position
        position = lengths + p if p < 0 else torch.full_like(lengths, p)
        if bool(((position < 0) | (position >= lengths)).any()):
            raise ValueError(f"position {p} lies outside a sequence of {int(lengths.min())} real tokens: "
                             "choose a position every sequence has (negative counts from the end)")
        if self.params.token is None:
            with torch.no_grad():
                logits = logits_of(hook_free_view(self.view), input_ids, attention_mask)
            tokens = logits[torch.arange(len(position)), position].argmax(-1)
        else:
            tokens = torch.full_like(lengths, token_id(self.view, self.params.token, "token"))

        def logit(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return logits[torch.arange(len(rows)), position[rows], tokens[rows]]
        return logit, int(position.max()) + 1

    def update(self, step: Step) -> None:
        targets = step.targets
        ids, mask = targets.model_input, step.batch.attention_mask
        objective, reads = self._objective(ids, mask, targets.target_ids, targets.target_mask)
        at_input = None
        if self.params.target == "loss":  # F(x) is the shared pass's loss: no forward of our own for it
            weights = targets.target_mask.double()
            at_input = (step["token_loss"].double() * weights).sum(-1) / weights.sum(-1).clamp(min=1)
        # the run's capture hooks are installed during update: the path runs on the hook-free twin
        result = integrated_gradients(hook_free_view(self.view), ids, mask, self._baseline(ids), objective,
                                      steps=self.params.steps, rule=self.params.rule, chunk=self.params.chunk,
                                      at_input=at_input, reads=reads)
        rows = slice(self.filled, self.filled + ids.shape[0])
        attributions = result.attributions.cpu().masked_fill(~mask.bool().cpu(), math.nan)
        self.attributions[rows, :ids.shape[1]] = attributions
        self.ends[0, rows], self.ends[1, rows] = result.at_input.cpu(), result.at_baseline.cpu()
        self.filled += ids.shape[0]

    def finalize(self) -> dict[str, Any]:
        attributions = self.attributions[:self.filled]
        at_input, at_baseline = self.ends[0, :self.filled], self.ends[1, :self.filled]
        difference = at_input - at_baseline
        error = (attributions.nansum(-1) - difference).abs()
        relative = error / difference.abs()
        return {"attributions": attributions, "at_input": at_input, "at_baseline": at_baseline,
                "completeness_error": ScalarValue(value=float(error.max()), n=self.filled, unit="F units"),
                "completeness_relative": ScalarValue(value=float(relative.nan_to_num(nan=0.0).max()), n=self.filled)}
