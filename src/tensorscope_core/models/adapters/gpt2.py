"""GPT-2: learned positions, fused c_attn (Conv1D, x @ W), GELU MLP."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..view import HeadWeights, ModelView
from .base import get_path, hf_model_type, linear_out_in, lm_parts, split_bias, split_heads_in, split_heads_out


class GPT2Adapter:
    name = "gpt2"

    def matches(self, model: nn.Module) -> bool:
        return hf_model_type(model) == "gpt2"

    def build(self, model: nn.Module, name: str, tokenizer: Any = None) -> ModelView:
        config: Any = model.config
        body: Any = get_path(model, "transformer", self.name) if hasattr(model, "transformer") else model
        blocks = list(get_path(body, "h", self.name))
        d, H = config.n_embd, config.n_head
        dh = d // H

        def head_weights(layer: int) -> HeadWeights:
            attn = blocks[layer].attn
            qkv = linear_out_in(attn.c_attn)  # [3d, d]
            bias = attn.c_attn.bias
            q, k, v = qkv.split(d, dim=0)
            bq, bk, bv = (None, None, None) if bias is None else bias.split(d)
            return HeadWeights(split_heads_in(q, H, dh), split_heads_in(k, H, dh),
                               split_heads_in(v, H, dh),
                               split_heads_out(linear_out_in(attn.c_proj), H, dh),
                               split_bias(bq, H, dh), split_bias(bk, H, dh), split_bias(bv, H, dh),
                               tuple(range(H)))

        embed, unembed = lm_parts(model)
        return ModelView(
            model=model, name=name, family=self.name, n_layers=len(blocks), d_model=d,
            n_heads=H, n_kv_heads=H, d_head=dh, d_mlp=config.n_inner or 4 * d,
            vocab_size=config.vocab_size, max_positions=config.n_positions, causal=True,
            rotary=False, embed=embed, blocks=blocks, attn=[b.attn for b in blocks],
            mlp_out=[b.mlp.c_proj for b in blocks], attn_out=[b.attn.c_proj for b in blocks],
            final_norm=body.ln_f, unembed=unembed,
            head_weights_fn=head_weights, tokenizer=tokenizer, config=config,
            pad_token_id=getattr(config, "pad_token_id", None) or 0)
