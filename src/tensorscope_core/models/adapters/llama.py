"""LLaMA-layout decoders: ``model.layers[l].self_attn.{q,k,v,o}_proj``, ``mlp.down_proj``, ``model.norm``.

Llama, Mistral (sliding window), Qwen2 (Q/K/V biases), Qwen3 (QK-norm), SmolLM3 and OLMo share it
as is; Gemma-3 and Phi-3 are variants (their own family names, below). Rotary positions and
grouped-query attention throughout. Sliding windows, QK-norm and extra norms change how scores or
the residual stream are computed, not where the projections are, so the view is the same; the
per-head weights are the projections' own (before any QK-norm or rotation).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..view import HeadWeights, ModelView
from .base import Projection, get_path, heads_of, hf_common, hf_model_type, lm_parts, weight_bias

LLAMA_LIKE = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo", "olmo2"})


class LlamaAdapter:
    name = "llama"
    model_types: frozenset[str] = LLAMA_LIKE

    def matches(self, model: nn.Module) -> bool:
        return hf_model_type(model) in self.model_types

    def projections(self, attn: Any, n_heads: int, n_kv_heads: int, d_head: int) -> list[Projection]:
        """The Q, K, V projections of one attention module (separate q_proj/k_proj/v_proj here)."""
        return [weight_bias(attn.q_proj), weight_bias(attn.k_proj), weight_bias(attn.v_proj)]

    def build(self, model: nn.Module, name: str, tokenizer: Any = None) -> ModelView:
        common = hf_common(model)
        body: Any = get_path(model, "model", self.name) if hasattr(model, "model") else model
        blocks = list(get_path(body, "layers", self.name))
        H, Hkv, dh = common["n_heads"], common["n_kv_heads"], common["d_head"]

        def head_weights(layer: int) -> HeadWeights:
            attn = blocks[layer].self_attn
            q, k, v = self.projections(attn, H, Hkv, dh)
            return heads_of(q, k, v, attn.o_proj.weight, H, Hkv, dh)

        embed, unembed = lm_parts(model)
        return ModelView(
            model=model, name=name, family=self.name, n_layers=len(blocks), causal=True,
            rotary=True, embed=embed, blocks=blocks, attn=[b.self_attn for b in blocks],
            mlp_out=[b.mlp.down_proj for b in blocks],
            attn_out=[b.self_attn.o_proj for b in blocks], final_norm=body.norm, unembed=unembed,
            head_weights_fn=head_weights, tokenizer=tokenizer, **common)


class Gemma3Adapter(LlamaAdapter):
    """Gemma-3 text models (``Gemma3ForCausalLM``; the multimodal ``gemma3`` wrapper is not mapped).

    The LLaMA layout with multi-query attention, QK-norm, norms before and after both the
    attention and the MLP, interleaved sliding-window and global layers, and embeddings scaled by
    sqrt(d_model) inside the embedding module (so ``view.embed(ids)`` is what the first block reads;
    ``view.embed.weight`` is unscaled).
    """

    name = "gemma3"
    model_types = frozenset({"gemma3_text"})


class Phi3Adapter(LlamaAdapter):
    """Phi-3: the LLaMA layout with Q, K and V fused in one ``qkv_proj`` (rows: all query heads,
    then the key heads, then the value heads) and gate/up fused in ``gate_up_proj``."""

    name = "phi3"
    model_types = frozenset({"phi3"})

    def projections(self, attn: Any, n_heads: int, n_kv_heads: int, d_head: int) -> list[Projection]:
        sizes = [n_heads * d_head, n_kv_heads * d_head, n_kv_heads * d_head]
        weights = attn.qkv_proj.weight.split(sizes, dim=0)
        bias = attn.qkv_proj.bias
        biases = [None] * 3 if bias is None else bias.split(sizes)
        return list(zip(weights, biases, strict=True))
