"""LLaMA family (Llama, Mistral, Qwen2/3, SmolLM): rotary positions, grouped-query attention."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..view import HeadWeights, ModelView
from .base import get_path, hf_common, hf_model_type, lm_parts, split_bias, split_heads_in, split_heads_out

LLAMA_LIKE = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo", "olmo2"})


class LlamaAdapter:
    name = "llama"

    def matches(self, model: nn.Module) -> bool:
        return hf_model_type(model) in LLAMA_LIKE

    def build(self, model: nn.Module, name: str, tokenizer: Any = None) -> ModelView:
        common = hf_common(model)
        body: Any = get_path(model, "model", self.name) if hasattr(model, "model") else model
        blocks = list(get_path(body, "layers", self.name))
        H, Hkv, dh = common["n_heads"], common["n_kv_heads"], common["d_head"]

        def head_weights(layer: int) -> HeadWeights:
            attn = blocks[layer].self_attn
            group = H // Hkv
            return HeadWeights(
                split_heads_in(attn.q_proj.weight, H, dh), split_heads_in(attn.k_proj.weight, Hkv, dh),
                split_heads_in(attn.v_proj.weight, Hkv, dh), split_heads_out(attn.o_proj.weight, H, dh),
                split_bias(attn.q_proj.bias, H, dh), split_bias(attn.k_proj.bias, Hkv, dh),
                split_bias(attn.v_proj.bias, Hkv, dh), tuple(h // group for h in range(H)))

        embed, unembed = lm_parts(model)
        return ModelView(
            model=model, name=name, family=self.name, n_layers=len(blocks), causal=True,
            rotary=True, embed=embed, blocks=blocks, attn=[b.self_attn for b in blocks],
            mlp_out=[b.mlp.down_proj for b in blocks],
            attn_out=[b.self_attn.o_proj for b in blocks], final_norm=body.norm, unembed=unembed,
            head_weights_fn=head_weights, tokenizer=tokenizer, **common)
