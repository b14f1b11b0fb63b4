"""The adapter contract and helpers shared by the first-party adapters."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ...errors import UnsupportedModelError
from ..view import HeadWeights, ModelView


@runtime_checkable
class Adapter(Protocol):
    """Maps one family of models onto a ModelView.

    ``matches`` must be cheap and side-effect free; ``build`` may raise
    UnsupportedModelError naming the part it could not find.
    """

    name: str

    def matches(self, model: nn.Module) -> bool: ...

    def build(self, model: nn.Module, name: str, tokenizer: Any = None) -> ModelView: ...


def hf_model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def get_path(model: nn.Module, path: str, family: str) -> Any:
    """Attribute path lookup that names the missing part on failure."""
    obj: Any = model
    for part in path.split("."):
        if not hasattr(obj, part):
            raise UnsupportedModelError(
                f"{family} adapter: {type(model).__name__} has no '{path}' (missing '{part}')",
                "use the generic adapter with your module names: "
                "analyze(..., adapter=GenericAdapter(blocks=..., ...))")
        obj = getattr(obj, part)
    return obj


def linear_out_in(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weight as [out, in] for nn.Linear and HF's Conv1D (which stores [in, out]). ``weight``: the module's
    weight as read elsewhere (``ModelView.weight_of``, which loads a dispatched model's offloaded one)."""
    if weight is None:
        weight = module.weight  # type: ignore[assignment]
    assert weight is not None
    return weight.T if type(module).__name__ == "Conv1D" else weight


def split_heads_in(weight_out_in: torch.Tensor, n: int, d_head: int) -> torch.Tensor:
    """[n*d_head, d_model] projection -> [n, d_model, d_head] in the x @ W convention."""
    return weight_out_in.reshape(n, d_head, -1).transpose(1, 2)


def split_heads_out(weight_out_in: torch.Tensor, n: int, d_head: int) -> torch.Tensor:
    """[d_model, n*d_head] output projection -> [n, d_head, d_model]."""
    return weight_out_in.T.reshape(n, d_head, -1)


def split_bias(bias: torch.Tensor | None, n: int, d_head: int) -> torch.Tensor | None:
    return None if bias is None else bias.reshape(n, d_head)


#: a projection's weight [out, in] and bias (None where absent)
Projection = tuple[torch.Tensor, torch.Tensor | None]


def weight_bias(linear: nn.Module) -> Projection:
    return linear.weight, linear.bias  # type: ignore[return-value]


def heads_of(q: Projection, k: Projection, v: Projection, o_weight: torch.Tensor,
             n_heads: int, n_kv_heads: int, d_head: int) -> HeadWeights:
    """HeadWeights of separate Q, K, V and output projections; query head h reads K/V head
    h // (n_heads / n_kv_heads) (grouped-query; multi-query when n_kv_heads is 1)."""
    (wq, bq), (wk, bk), (wv, bv) = q, k, v
    group = n_heads // n_kv_heads
    return HeadWeights(
        split_heads_in(wq, n_heads, d_head), split_heads_in(wk, n_kv_heads, d_head),
        split_heads_in(wv, n_kv_heads, d_head), split_heads_out(o_weight, n_heads, d_head),
        split_bias(bq, n_heads, d_head), split_bias(bk, n_kv_heads, d_head), split_bias(bv, n_kv_heads, d_head),
        tuple(h // group for h in range(n_heads)))


def lm_parts(module: nn.Module) -> tuple[nn.Embedding, nn.Module | None]:
    model: Any = module
    embed = model.get_input_embeddings()
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return embed, unembed


def hf_common(model: nn.Module) -> dict[str, Any]:
    config: Any = model.config
    n_heads = config.num_attention_heads
    d_model = config.hidden_size
    return {
        "d_model": d_model,
        "n_heads": n_heads,
        "n_kv_heads": getattr(config, "num_key_value_heads", None) or n_heads,
        "d_head": getattr(config, "head_dim", None) or d_model // n_heads,
        "d_mlp": getattr(config, "intermediate_size", None) or 4 * d_model,
        "vocab_size": config.vocab_size,
        "max_positions": getattr(config, "max_position_embeddings", None),
        "config": config,
        "pad_token_id": getattr(config, "pad_token_id", None) or 0,
    }
