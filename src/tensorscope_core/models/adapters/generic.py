"""An adapter configured by module names, for architectures no adapter knows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ...errors import UnsupportedModelError
from ..view import ModelView
from .base import get_path, hf_model_type, linear_out_in


@dataclass
class GenericAdapter:
    """Map a model by dotted module paths.

    ``blocks`` names the ModuleList of transformer blocks; ``attn`` and ``mlp_out`` are
    paths *inside* one block (``mlp_out`` is the module whose input is the MLP hidden
    units; the optional ``attn_out`` the attention output projection, whose input is the
    heads' outputs concatenated head-major). Per-head weights are not mapped, so head-level
    weight metrics skip.
    """

    blocks: str
    attn: str
    mlp_out: str
    n_heads: int
    final_norm: str | None = None
    attn_out: str | None = None
    embed: str | None = None
    unembed: str | None = None
    causal: bool = True
    rotary: bool = False
    n_kv_heads: int | None = None
    max_positions: int | None = None
    name: str = "generic"

    def matches(self, model: nn.Module) -> bool:
        return False  # used only when the user passes it explicitly

    def build(self, module: nn.Module, name: str, tokenizer: Any = None) -> ModelView:
        model: Any = module
        family = f"generic({hf_model_type(model) or type(model).__name__})"
        blocks = list(get_path(model, self.blocks, family))
        if not blocks:
            raise UnsupportedModelError(f"'{self.blocks}' holds no blocks", "point blocks= at the ModuleList of layers")
        embed = get_path(model, self.embed, family) if self.embed else model.get_input_embeddings()
        if not isinstance(embed, nn.Embedding):
            raise UnsupportedModelError(f"{family}: token embedding is {type(embed).__name__}, not nn.Embedding",
                                        "pass embed='path.to.embedding'")
        unembed = get_path(model, self.unembed, family) if self.unembed else (
            model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None)
        d_model = embed.embedding_dim
        mlp_out = [get_path(b, self.mlp_out, family) for b in blocks]
        # the width of mlp_out's input: weight [out, in] for nn.Linear, [in, out] for HF's Conv1D (GPT-2)
        d_mlp = int(linear_out_in(mlp_out[0]).shape[1]) if hasattr(mlp_out[0], "weight") else 4 * d_model
        return ModelView(
            model=model, name=name, family=family, n_layers=len(blocks), d_model=d_model,
            n_heads=self.n_heads, n_kv_heads=self.n_kv_heads or self.n_heads,
            d_head=d_model // self.n_heads, d_mlp=d_mlp, vocab_size=embed.num_embeddings,
            max_positions=self.max_positions, causal=self.causal, rotary=self.rotary, embed=embed,
            blocks=blocks, attn=[get_path(b, self.attn, family) for b in blocks], mlp_out=mlp_out,
            attn_out=[get_path(b, self.attn_out, family) for b in blocks] if self.attn_out else [],
            final_norm=get_path(model, self.final_norm, family) if self.final_norm else None,
            unembed=unembed, tokenizer=tokenizer, config=getattr(model, "config", None))
