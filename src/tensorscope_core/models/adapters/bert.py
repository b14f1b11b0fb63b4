"""BERT-style bidirectional encoders (BERT, RoBERTa): masked-LM loss, no causal mask."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..view import HeadWeights, ModelView
from .base import get_path, hf_common, hf_model_type, lm_parts, split_bias, split_heads_in, split_heads_out

BERT_LIKE = frozenset({"bert", "roberta"})


class BertAdapter:
    name = "bert"

    def matches(self, model: nn.Module) -> bool:
        return hf_model_type(model) in BERT_LIKE

    def build(self, model: nn.Module, name: str, tokenizer: Any = None) -> ModelView:
        common = hf_common(model)
        config: Any = model.config
        body: Any = getattr(model, config.model_type, model)
        blocks = list(get_path(body, "encoder.layer", self.name))
        H, dh = common["n_heads"], common["d_head"]

        def head_weights(layer: int) -> HeadWeights:
            attn = blocks[layer].attention
            s = attn.self
            return HeadWeights(
                split_heads_in(s.query.weight, H, dh), split_heads_in(s.key.weight, H, dh),
                split_heads_in(s.value.weight, H, dh), split_heads_out(attn.output.dense.weight, H, dh),
                split_bias(s.query.bias, H, dh), split_bias(s.key.bias, H, dh),
                split_bias(s.value.bias, H, dh), tuple(range(H)))

        embed, unembed = lm_parts(model)
        mask_id = getattr(tokenizer, "mask_token_id", None) if tokenizer is not None else None
        return ModelView(
            model=model, name=name, family=self.name, n_layers=len(blocks), causal=False,
            rotary=False, embed=embed, blocks=blocks, attn=[b.attention for b in blocks],
            mlp_out=[b.output.dense for b in blocks],
            attn_out=[b.attention.output.dense for b in blocks], final_norm=None, unembed=unembed,
            head_weights_fn=head_weights, tokenizer=tokenizer, mask_token_id=mask_id, **common)
