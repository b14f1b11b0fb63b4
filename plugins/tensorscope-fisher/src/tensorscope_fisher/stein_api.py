"""The plain functional API of the activation Fisher, for use outside a TensorScope run."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tensorscope_core.plugin_api import BadParameterError, ModelView, model_view

from .stein import (
    METHODS,
    Method,
    Site,
    check_layer,
    context_states,
    eig_fisher,
    exact_fisher,
    resolve_positions,
    sampled_fisher,
    topk_fisher,
)


def _sites(view: ModelView, layer: int, input_ids: torch.Tensor, position: int) -> list[Site]:
    check_layer(view, layer)
    ids = input_ids[None] if input_ids.ndim == 1 else input_ids
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise BadParameterError(f"input_ids must be [batch, seq_len] token ids, got shape {tuple(input_ids.shape)}",
                                "pass unpadded rows of equal length (the fisher.stein metric handles padding)")
    (pos,) = resolve_positions([position], ids.shape[1])
    ids = ids.to(view.embed.weight.device)
    return [Site(context_states(view, row)[0], pos, int(row[pos])) for row in ids]


def fisher_stein(model: nn.Module | ModelView, layer: int, input_ids: torch.Tensor, *, position: int = -1,
                 method: Method = "exact", draws: int = 64, topk: int = 1024, seed: int = 0,
                 adapter: Any = None) -> torch.Tensor:
    """Activation Fisher [batch, d, d] of each row's next-token distribution w.r.t. the residual entering
    block ``layer`` at ``position`` (the other positions are context), in the model's dtype.

    ``method``: ``exact`` (closed form), ``sampled`` (``draws`` Monte-Carlo scores, unbiased; seeded by
    ``seed``), ``topk`` (the ``topk`` most probable tokens, not renormalised: a lower bound, see
    ``tensorscope_fisher.stein``). For top eigenpairs without the matrix use ``fisher_stein_eig``. Works on
    a Hugging Face causal LM (or any model an installed adapter maps) or a ``ModelView``.
    """
    if method not in METHODS or method == "eig":
        raise BadParameterError(f"method={method!r} is not one of 'exact', 'sampled', 'topk' here",
                                "use fisher_stein_eig(...) for the matrix-free top eigenpairs")
    generator = torch.Generator().manual_seed(seed)
    with model_view(model, adapter) as view:
        out = []
        for site in _sites(view, layer, input_ids, position):
            if method == "exact":
                matrix = exact_fisher(view, layer, site)
            elif method == "topk":
                matrix = topk_fisher(view, layer, site, topk).fisher
            else:
                matrix = sampled_fisher(view, layer, site, draws, generator)
            out.append(matrix.detach())
        return torch.stack(out)


def fisher_stein_eig(model: nn.Module | ModelView, layer: int, input_ids: torch.Tensor, *, position: int = -1,
                     rank: int = 8, max_iter: int = 200, tol: float = 1e-8, seed: int = 0,
                     adapter: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` eigenvalues [batch, rank] (descending) and eigenvectors [batch, d, rank] of each row's
    activation Fisher, matrix-free: Lanczos on ``v -> J^T (diag p - p p^T) J v`` (one JVP + one VJP each)."""
    with model_view(model, adapter) as view:
        results = [eig_fisher(view, layer, [site], rank, max_iter=max_iter, tol=tol, seed=seed)
                   for site in _sites(view, layer, input_ids, position)]
    return torch.stack([r.eigenvalues for r in results]), torch.stack([r.eigenvectors for r in results])
