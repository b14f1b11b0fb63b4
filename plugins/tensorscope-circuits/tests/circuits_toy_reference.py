"""A linear toy language model whose answers are known in closed form.

Embedding e_t (no positions), one block: h_t = e_t + mean_{s <= t} e_s (causal uniform mixing,
through the module ``attn``) followed by h_t <- h_t + mlp(h_t) with a zero MLP, then logits
U h_t. Everything is linear, so the logit at the last position T-1 is
u_k . (e_{T-1} + (1/T) sum_s e_s) and its gradient w.r.t. e_s is u_k (1/T + [s = T-1]).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from tensorscope_core import GenericAdapter


class CausalMean(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        t = h.shape[1]
        weights = torch.ones(t, t, dtype=h.dtype).tril()
        return (weights / weights.sum(-1, keepdim=True)) @ h


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn = CausalMean()
        self.mlp = nn.Linear(d, d)
        nn.init.zeros_(self.mlp.weight)
        nn.init.zeros_(self.mlp.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(h)
        return h + self.mlp(h)


class ToyLM(nn.Module):
    def __init__(self, vocab: int = 16, d: int = 8, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.tok = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d)])
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                use_cache: bool = False, **_: object) -> SimpleNamespace:
        h = self.tok(input_ids)
        for block in self.layers:
            h = block(h)
        return SimpleNamespace(logits=self.head(h))


def toy_adapter() -> GenericAdapter:
    return GenericAdapter(blocks="layers", attn="attn", mlp_out="mlp", n_heads=1, embed="tok", unembed="head")
