"""OPT: learned positions (offset 2), separate biased Q/K/V, ReLU MLP on tokens flattened to [batch * seq, d].

Block (pre-norm, 125M, 1.3B and up): ``x + attn(ln(x))`` then ``x + fc2(relu(fc1(ln(x))))``; 350M norms
after each sum instead. The decoder layer reshapes the residual stream to [batch * seq, d] around its
MLP, so ``mlp_tokens_flat`` tells captures to read MLP tensors back as [batch, seq, ...]. Checkpoints with
``word_embed_proj_dim != hidden_size`` (350M) project the stream in and out of a narrower embedding; the
view has no slot for those projections, so they are refused rather than read wrongly.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...errors import UnsupportedModelError
from ..view import HeadWeights, ModelView
from .base import get_path, heads_of, hf_model_type, lm_parts, weight_bias


class OPTAdapter:
    name = "opt"

    def matches(self, model: nn.Module) -> bool:
        return hf_model_type(model) == "opt"

    def build(self, model: nn.Module, name: str, tokenizer: Any = None) -> ModelView:
        config: Any = model.config
        if config.word_embed_proj_dim != config.hidden_size:
            raise UnsupportedModelError(
                f"{name}: OPT with word_embed_proj_dim {config.word_embed_proj_dim} != hidden_size "
                f"{config.hidden_size} (project_in/project_out around the decoder) is not supported",
                fix="use an OPT checkpoint whose embedding width equals its hidden size (125M, 1.3B and up), "
                    "or pass adapter=GenericAdapter(...) for metrics that only read blocks")
        decoder: Any = get_path(model, "model.decoder", self.name) if hasattr(model, "model") else model.decoder
        blocks = list(get_path(decoder, "layers", self.name))
        d, H = config.hidden_size, config.num_attention_heads
        dh = d // H

        def head_weights(layer: int) -> HeadWeights:
            attn = blocks[layer].self_attn
            return heads_of(weight_bias(attn.q_proj), weight_bias(attn.k_proj), weight_bias(attn.v_proj),
                            attn.out_proj.weight, H, H, dh)

        embed, unembed = lm_parts(model)
        return ModelView(
            model=model, name=name, family=self.name, n_layers=len(blocks), d_model=d, n_heads=H,
            n_kv_heads=H, d_head=dh, d_mlp=config.ffn_dim, vocab_size=config.vocab_size,
            max_positions=config.max_position_embeddings, causal=True, rotary=False, embed=embed,
            blocks=blocks, attn=[b.self_attn for b in blocks], mlp_out=[b.fc2 for b in blocks],
            attn_out=[b.self_attn.out_proj for b in blocks], final_norm=decoder.final_layer_norm,
            unembed=unembed, head_weights_fn=head_weights, tokenizer=tokenizer, config=config,
            pad_token_id=getattr(config, "pad_token_id", None) or 0, mlp_tokens_flat=True)
