"""What autograd keeps per token in one transformer block, by architecture: measured, not guessed.

A backward's memory is mostly the tensors the forward saved for it. How many depends on the block: a
gated MLP (LLaMA) keeps four ``d_mlp``-wide tensors where GPT-2's keeps five (its tanh GELU is made of
elementwise steps) and OPT's one; RMSNorm in a 16-bit model keeps float32 copies; eager attention keeps
the softmax (in float32 first, in most 16-bit decoders); QK-norm keeps the keys again. The coefficients
below are least-squares fits of the bytes autograd saved (unique storages, weights excluded) over 16-32
tiny models per family (d_model 64-128, d_mlp 128-384, 2-8 heads, 16-48 positions, with and without
grouped-query attention), in float32 and bfloat16; every fit is within 1% of its models. The test
``tests/test_block_activations.py`` measures each family again against this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .view import ModelView


@dataclass(frozen=True)
class BlockSaving:
    """Bytes one block saves for the backward per token: per unit of ``d_model``, of ``d_mlp``, of
    heads x positions (the attention pattern) and of ``n_kv_heads * d_head`` (keys normalised again)."""

    d_model: float
    d_mlp: float
    attention: float
    kv: float = 0.0

    def per_token(self, view: ModelView, seq: int) -> float:
        return (self.d_model * view.d_model + self.d_mlp * view.d_mlp + self.attention * view.n_heads * seq
                + self.kv * view.n_kv_heads * view.d_head)


#: HF ``model_type`` -> (float32 model, 16-bit model)
_LLAMA = (BlockSaving(40.1, 16.0, 4.0), BlockSaving(24.1, 8.0, 6.0))
SAVED: dict[str, tuple[BlockSaving, BlockSaving]] = {
    **{kind: _LLAMA for kind in ("llama", "mistral", "qwen2", "smollm3", "phi3")},
    "qwen3": (BlockSaving(48.1, 16.1, 4.2, 8.2), BlockSaving(30.1, 8.1, 6.2, 6.2)),
    "olmo": (BlockSaving(32.1, 16.1, 4.1), BlockSaving(20.1, 8.1, 6.1)),
    "olmo2": (BlockSaving(48.1, 16.1, 4.1, 8.0), BlockSaving(36.1, 8.1, 6.1, 8.0)),
    "gemma3_text": (BlockSaving(64.6, 16.1, 4.1, 8.2), BlockSaving(52.6, 8.1, 6.1, 8.2)),
    "gpt2": (BlockSaving(32.1, 20.1, 4.1), BlockSaving(16.1, 10.1, 2.1)),
    "gptj": (BlockSaving(24.5, 20.1, 4.1), BlockSaving(16.3, 10.1, 6.1)),
    "gpt_neox": (BlockSaving(28.1, 8.1, 4.1), BlockSaving(14.1, 4.1, 6.1)),
    "opt": (BlockSaving(32.1, 4.1, 4.1), BlockSaving(16.1, 2.1, 6.1)),
    "bert": (BlockSaving(32.1, 8.1, 4.1), BlockSaving(16.1, 4.1, 2.1)),
}


def _most(pick: int) -> BlockSaving:
    rows = [pair[pick] for pair in SAVED.values()]
    return BlockSaving(max(r.d_model for r in rows), max(r.d_mlp for r in rows),
                       max(r.attention for r in rows), max(r.kv for r in rows))


#: for an architecture not measured (the generic adapter): the largest coefficient of each kind
UNMEASURED = (_most(0), _most(1))


def block_saving(view: ModelView) -> BlockSaving:
    """The coefficients for ``view``'s architecture and dtype, in bytes; a float64 model keeps twice a
    float32 one's."""
    pair = SAVED.get(str(getattr(view.config, "model_type", "")), UNMEASURED)
    if view.dtype_bytes <= 2:
        return pair[1]
    wide, scale = pair[0], view.dtype_bytes / 4
    return BlockSaving(wide.d_model * scale, wide.d_mlp * scale, wide.attention * scale, wide.kv * scale)


#: HF ``model_type`` -> what a block's first-order graph holds when kept for a second differentiation
#: (``autograd.grad(..., create_graph=True)``: the forward's saved tensors and those the backward saves
#: in turn), as a multiple of what the block saves for one backward. Measured as the table above (2- and
#: 1-block models, unique storages, weights left out), in float32 and bfloat16 (the larger kept), at
#: d_model 96-128; ``tests/test_block_activations.py`` measures each family again.
SECOND_ORDER: dict[str, float] = {
    **{kind: 2.65 for kind in ("llama", "mistral", "qwen2", "smollm3", "phi3")},
    "qwen3": 2.72, "gemma3_text": 2.48, "gpt2": 2.05, "gptj": 2.08, "gpt_neox": 2.11, "opt": 2.12, "bert": 2.10,
}


def second_order_ratio(view: ModelView) -> float:
    """``SECOND_ORDER``'s ratio for ``view``'s architecture; the largest one for an architecture not measured."""
    return SECOND_ORDER.get(str(getattr(view.config, "model_type", "")), max(SECOND_ORDER.values()))


def block_saved_bytes(view: ModelView, batch: int, seq: int) -> int:
    """Bytes one block of ``view`` saves for the backward over a batch of ``batch`` x ``seq`` tokens."""
    return int(batch * seq * block_saving(view).per_token(view, seq))
