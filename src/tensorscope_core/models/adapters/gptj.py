"""GPT-J: attention and MLP in parallel off one norm, separate Q/K/V (no biases), interleaved rotary.

Block: ``x + attn(ln_1(x)) + mlp(ln_1(x))``. Rotary pairs neighbouring dims (2i, 2i+1) of the
first ``rotary_dim`` of each head (not Hugging Face's rotate_half halves); the per-head weights
are the projections' own columns, before any rotation.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..view import HeadWeights, ModelView
from .base import get_path, heads_of, hf_model_type, lm_parts, weight_bias


class GPTJAdapter:
    name = "gptj"

    def matches(self, model: nn.Module) -> bool:
        return hf_model_type(model) == "gptj"

    def build(self, model: nn.Module, name: str, tokenizer: Any = None) -> ModelView:
        config: Any = model.config
        body: Any = get_path(model, "transformer", self.name) if hasattr(model, "transformer") else model
        blocks = list(get_path(body, "h", self.name))
        d, H = config.n_embd, config.n_head
        dh = d // H

        def head_weights(layer: int) -> HeadWeights:
            attn = blocks[layer].attn
            return heads_of(weight_bias(attn.q_proj), weight_bias(attn.k_proj), weight_bias(attn.v_proj),
                            attn.out_proj.weight, H, H, dh)

        embed, unembed = lm_parts(model)
        return ModelView(
            model=model, name=name, family=self.name, n_layers=len(blocks), d_model=d, n_heads=H,
            n_kv_heads=H, d_head=dh, d_mlp=config.n_inner or 4 * d, vocab_size=config.vocab_size,
            max_positions=config.n_positions, causal=True, rotary=True, embed=embed, blocks=blocks,
            attn=[b.attn for b in blocks], mlp_out=[b.mlp.fc_out for b in blocks],
            attn_out=[b.attn.out_proj for b in blocks], final_norm=body.ln_f, unembed=unembed,
            head_weights_fn=head_weights, tokenizer=tokenizer, config=config,
            pad_token_id=getattr(config, "pad_token_id", None) or 0)
