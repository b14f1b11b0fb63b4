"""circuits.logit_lens: what the residual stream would predict if the model stopped at each layer."""

from __future__ import annotations

from typing import Any

import torch

from tensorscope_core.plugin_api import Cost, LayerValue, Metric, ModelView, NoParams, PreparedData, RunShape, Step

#: target tokens sent through the unembedding at once (bounds the [tokens, vocab] float64 block)
TOKENS_PER_CHUNK = 64
#: largest |log p| difference tolerated between the lens at the last entry and the model's own output
SELF_CHECK_ATOL = 1e-3
QUANTITIES = ("kl", "top1_agreement", "next_token_rank", "next_token_logprob")


def lens_stats(view: ModelView, hidden: torch.Tensor, final_logp: torch.Tensor,
               target_ids: torch.Tensor) -> torch.Tensor:
    """Per token: [KL(final || lens), top-1 agreement, 1-based rank of the target, log p(target)].

    ``hidden`` [n, d_model] is a residual-stream entry at n target positions, ``final_logp``
    [n, vocab] the model's own log-probabilities there (float64), ``target_ids`` [n].
    """
    assert view.final_norm is not None and view.unembed is not None
    with torch.no_grad():
        logp = torch.log_softmax(view.unembed(view.final_norm(hidden)).double(), dim=-1)
    kl = (final_logp.exp() * (final_logp - logp)).sum(-1)
    agree = (logp.argmax(-1) == final_logp.argmax(-1)).double()
    target_logp = logp.gather(-1, target_ids[:, None])
    rank = (logp > target_logp).sum(-1).double() + 1
    return torch.stack([kl, agree, rank, target_logp[:, 0]], dim=-1)


class LogitLens(Metric):
    """The logit lens (nostalgebraist, 2020): each residual-stream entry ``resid[l]`` (l = 0
    enters block 0, l = n_layers leaves the last block) sent through the model's final norm
    and unembedding, ``p_l = softmax(unembed(final_norm(resid[l])))``, compared at every target
    position (the core's target mask: a real next token) with the model's own output ``p``:

    - ``kl``: mean KL(p || p_l) in nats (0 at the last entry, which is the model's output);
    - ``top1_agreement``: fraction of positions where argmax p_l = argmax p;
    - ``next_token_rank``: mean rank of the actual next token under p_l (1 = top);
    - ``next_token_logprob``: mean log p_l(actual next token).

    Means are over target tokens (every token weighs the same). The log-softmax runs in
    float64 on the lens logits computed in the model's dtype. As a self-check, the lens at the
    last entry must reproduce the model's log-probabilities within 1e-3, or the metric fails
    (a model whose head is more than final norm + unembedding). Causal models only.
    """

    name = "circuits.logit_lens"
    supports_dispatch = True  # reads the shared pass's activations / outputs only
    version = "1"
    summary = "per layer: KL to the final prediction, top-1 agreement, next-token rank and log-prob"
    Params = NoParams
    artifacts = ("resid", "logits")
    fields = {q: f"per resid entry (embed, after block 0, ...): mean {q.replace('_', ' ')}" for q in QUANTITIES}

    @classmethod
    def skip_reason(cls, params: NoParams, view: ModelView, data: PreparedData | None) -> str | None:
        if not view.causal:
            return "the logit lens reads next-token predictions: it needs a causal model"
        if view.final_norm is None or view.unembed is None:
            return f"the {view.family} adapter maps no final norm and unembedding"
        return None

    @classmethod
    def cost(cls, params: NoParams, view: ModelView, shape: RunShape) -> Cost:
        tokens = shape.n_sequences * shape.seq_len
        flops = 2.0 * (view.n_layers + 1) * tokens * view.d_model * view.vocab_size
        # the logits at the batch's targets (a masked copy), and per chunk five float64 [tokens, vocab] blocks
        # at once: the final and a layer's lens log-probabilities, and exp, difference and product of the KL
        targets = shape.batch_size * shape.seq_len
        block = 8 * min(TOKENS_PER_CHUNK, targets) * view.vocab_size
        working = 5 * block + targets * view.vocab_size * view.dtype_bytes
        return Cost(state_bytes=8 * (len(QUANTITIES) * (view.n_layers + 1) + 1), flops=flops, transient_bytes=working)

    def setup(self) -> None:
        self.sums = torch.zeros(self.view.n_layers + 1, len(QUANTITIES), dtype=torch.float64)
        self.tokens = torch.zeros((), dtype=torch.float64)

    def update(self, step: Step) -> None:
        targets = step.targets
        where = step.target_mask.bool()
        target_ids = targets.target_ids[where]
        resid = [r[where] for r in step["resid"]]
        final = step["logits"][where]
        for start in range(0, len(target_ids), TOKENS_PER_CHUNK):
            chunk = slice(start, start + TOKENS_PER_CHUNK)
            final_logp = torch.log_softmax(final[chunk].double(), dim=-1)
            for layer, hidden in enumerate(resid):
                stats = lens_stats(self.view, hidden[chunk], final_logp, target_ids[chunk])
                self.sums[layer] += stats.sum(0).cpu()
            self._self_check(resid[-1][chunk], final_logp)
        self.tokens += float(where.sum())

    def _self_check(self, last: torch.Tensor, final_logp: torch.Tensor) -> None:
        assert self.view.final_norm is not None and self.view.unembed is not None
        with torch.no_grad():
            lens = torch.log_softmax(self.view.unembed(self.view.final_norm(last)).double(), dim=-1)
        gap = float((lens - final_logp).abs().max()) if lens.numel() else 0.0
        if gap > SELF_CHECK_ATOL:
            raise RuntimeError(f"final_norm + unembed of the last residual differ from the model's output by "
                               f"{gap:.3g} in log-probability: the {self.view.family} head is not just a final "
                               "norm and an unembedding, so the logit lens does not apply")

    def finalize(self) -> dict[str, Any]:
        if float(self.tokens) == 0:
            raise ValueError("the data hold no target tokens (every sequence has a single token)")
        means = self.sums / self.tokens
        return {q: LayerValue(values=means[:, i].tolist(), axis="resid") for i, q in enumerate(QUANTITIES)}
