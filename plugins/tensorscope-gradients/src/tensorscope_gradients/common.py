"""Helpers shared by the plugin's metrics: block norms, task checks, example texts."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from tensorscope_core.plugin_api import ModelView, float64_sum_of_squares

TEXT_CHARS = 120


def block_squares(view: ModelView, layer_of: dict[str, int | None],
                  grads: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """Sum of squared gradient entries per block; entry n_layers holds everything outside
    the blocks (embeddings, final norm, head). float64 [n_layers + 1]. ``grads`` by name, or (name, tensor)
    pairs read one at a time (``view.named_weights()``)."""
    squares = torch.zeros(view.n_layers + 1, dtype=torch.float64)
    for name, g in grads.items() if isinstance(grads, Mapping) else grads:
        layer = layer_of.get(name)
        squares[view.n_layers if layer is None else layer] += float64_sum_of_squares(g).cpu()
    return squares


def example_texts(view: ModelView, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[str]:
    """Each row's real tokens as text (the tokenizer's decode, else the ids), cut to 120 characters."""
    out = []
    for ids, mask in zip(input_ids, attention_mask, strict=True):
        real = ids[mask.bool()].tolist()
        if view.tokenizer is not None:
            text = str(view.tokenizer.decode(real, skip_special_tokens=True))
        else:
            text = "ids " + " ".join(map(str, real))
        out.append(text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS - 3] + "...")
    return out


def upper_bound_examples(n_sequences: int, n_batches: int, batch_size: int) -> int:
    """Most examples a run can feed a metric (max_batches may stop it before n_sequences)."""
    return min(n_sequences, n_batches * batch_size)
