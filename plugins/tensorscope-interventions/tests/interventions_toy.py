"""A hand-built float64 language model whose residual stream maps linearly to the logits: embeddings,
blocks that pass the stream through unchanged, no final norm, a linear unembedding. Steering it at any
position shifts every logit by exactly alpha W_U v."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from tensorscope_core.plugin_api import ModelView

VOCAB, D_MODEL, N_LAYERS = 24, 8, 3


class PassThrough(nn.Module):
    """A block that returns its input (it owns one unused parameter, so it is a block with weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor]:
        return (hidden_states,)


class LinearLM(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.tok = nn.Embedding(VOCAB, D_MODEL, dtype=torch.float64)
        self.layers = nn.ModuleList([PassThrough() for _ in range(N_LAYERS)])
        self.head = nn.Linear(D_MODEL, VOCAB, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.tok.weight.copy_(torch.randn(VOCAB, D_MODEL, generator=gen, dtype=torch.float64))
            self.head.weight.copy_(torch.randn(VOCAB, D_MODEL, generator=gen, dtype=torch.float64))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: Any = None, use_cache: bool = False, **kwargs: Any
    ) -> SimpleNamespace:
        hidden = self.tok(input_ids)
        for layer in self.layers:
            hidden = layer(hidden)[0]
        return SimpleNamespace(logits=self.head(hidden))


class LinearLMAdapter:
    name = "linear-lm"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, LinearLM)

    def build(self, model: LinearLM, name: str, tokenizer: Any = None) -> ModelView:
        blocks = list(model.layers)
        return ModelView(
            model=model,
            name=name,
            family="linear-lm",
            n_layers=N_LAYERS,
            d_model=D_MODEL,
            n_heads=1,
            n_kv_heads=1,
            d_head=D_MODEL,
            d_mlp=D_MODEL,
            vocab_size=VOCAB,
            max_positions=None,
            causal=True,
            rotary=False,
            embed=model.tok,
            blocks=blocks,
            attn=blocks,
            mlp_out=blocks,
            final_norm=None,
            unembed=model.head,
            tokenizer=tokenizer,
        )
