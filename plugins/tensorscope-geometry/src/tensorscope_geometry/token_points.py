"""The point cloud of a model's tokens: one row per vocabulary entry, from a chosen part of the model."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Literal

import torch

from tensorscope_core.plugin_api import ModelView, first_tensor, stopped_before

Source = Literal["embed", "unembed", "resid"]


def _vocab_rows(weight: torch.Tensor, vocab: int, what: str) -> torch.Tensor:
    if weight.ndim == 2 and weight.shape[0] == vocab:
        return weight
    if weight.ndim == 2 and weight.shape[1] == vocab:  # Conv1D-style [d, V]
        return weight.T
    raise ValueError(f"the {what} weight has shape {tuple(weight.shape)}, not [vocab={vocab}, d]")


def source_reason(view: ModelView, source: Source, layer: int | None) -> str | None:
    """Why this source does not exist on this model (None when it does)."""
    if source == "unembed" and getattr(view.unembed, "weight", None) is None:
        return "the model has no unembedding (output embedding) to test: use source='embed'"
    if source == "resid" and (layer is None or not 0 <= layer <= view.n_layers):
        return f"source='resid' needs layer in 0..{view.n_layers} (n_layers); got {layer}"
    return None


def token_points(view: ModelView, source: Source, layer: int | None = None, batch: int = 1024) -> torch.Tensor:
    """[V, d] rows, one per token id.

    ``embed``: the input embedding; ``unembed``: the output embedding (rows of the unembedding);
    ``resid``: the residual stream entering block ``layer`` (``layer == n_layers``: leaving the
    last block) when each token is fed alone, as a one-token sequence at position 0.
    """
    vocab = int(view.embed.weight.shape[0])
    if source == "embed":
        return view.weight_of(view.embed)
    reason = source_reason(view, source, layer)
    if reason is not None:
        raise ValueError(reason)
    if source == "unembed":
        assert view.unembed is not None
        return _vocab_rows(view.weight_of(view.unembed), vocab, "unembedding")
    assert layer is not None
    return _resid_of_single_tokens(view, layer, vocab, batch)


def _resid_of_single_tokens(view: ModelView, layer: int, vocab: int, batch: int) -> torch.Tensor:
    kept: list[torch.Tensor] = []

    def before(module: Any, args: tuple, kwargs: dict) -> None:
        kept.append((args[0] if args else kwargs["hidden_states"]).detach()[:, 0])

    def after(module: Any, args: tuple, output: Any) -> None:
        kept.append(first_tensor(output).detach()[:, 0])

    # each forward stops once the stream is kept: no later block, and no [batch, V] logits
    stop: torch.nn.Module | None
    if layer < view.n_layers:
        handle = view.blocks[layer].register_forward_pre_hook(before, with_kwargs=True)
        stop = view.blocks[layer]
    else:
        handle = view.blocks[-1].register_forward_hook(after)
        stop = view.final_norm if view.final_norm is not None else view.unembed
    device = view.input_device
    try:
        with torch.no_grad():
            for lo in range(0, vocab, batch):
                ids = torch.arange(lo, min(lo + batch, vocab), device=device)[:, None]
                with stopped_before(stop) if stop is not None else nullcontext():
                    view.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        handle.remove()
    return torch.cat(kept)
