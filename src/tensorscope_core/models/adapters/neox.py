"""GPT-NeoX (Pythia): fused per-head interleaved query_key_value, partial rotary."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..view import HeadWeights, ModelView
from .base import get_path, hf_common, hf_model_type, lm_parts, split_heads_out


class NeoXAdapter:
    name = "gpt_neox"

    def matches(self, model: nn.Module) -> bool:
        return hf_model_type(model) == "gpt_neox"

    def build(self, model: nn.Module, name: str, tokenizer: Any = None) -> ModelView:
        common = hf_common(model)
        body: Any = get_path(model, "gpt_neox", self.name) if hasattr(model, "gpt_neox") else model
        blocks = list(get_path(body, "layers", self.name))
        H, dh = common["n_heads"], common["d_head"]

        def head_weights(layer: int) -> HeadWeights:
            attn = blocks[layer].attention
            # query_key_value rows are laid out [head, (q|k|v), d_head].
            w = attn.query_key_value.weight.reshape(H, 3, dh, -1).transpose(2, 3)
            b = attn.query_key_value.bias
            bias = None if b is None else b.reshape(H, 3, dh)
            return HeadWeights(w[:, 0], w[:, 1], w[:, 2], split_heads_out(attn.dense.weight, H, dh),
                               None if bias is None else bias[:, 0],
                               None if bias is None else bias[:, 1],
                               None if bias is None else bias[:, 2], tuple(range(H)))

        embed, unembed = lm_parts(model)
        common["n_kv_heads"] = H
        return ModelView(
            model=model, name=name, family=self.name, n_layers=len(blocks), causal=True,
            rotary=True, embed=embed, blocks=blocks, attn=[b.attention for b in blocks],
            mlp_out=[b.mlp.dense_4h_to_h for b in blocks],
            attn_out=[b.attention.dense for b in blocks], final_norm=body.final_layer_norm,
            unembed=unembed, head_weights_fn=head_weights, tokenizer=tokenizer, **common)
