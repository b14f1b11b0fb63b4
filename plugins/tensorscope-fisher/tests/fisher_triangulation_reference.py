"""Dense float64 Fishers of a tiny model, per sequence, for fisher.triangulation's known answers."""

from __future__ import annotations

import torch
from torch.func import functional_call, jacrev


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters, tied ones once (named_parameters' order)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _flat(tree: dict[str, torch.Tensor], lead: int) -> torch.Tensor:
    return torch.cat([t.reshape(*t.shape[:lead], -1) for t in tree.values()], dim=-1)


def dense_fishers(model: torch.nn.Module, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(GGN, empirical Fisher) [P, P] per sequence over unpadded ``rows`` [n, T] of a causal LM.

    GGN = (1/n) Σ_i Σ_t J_itᵀ (diag p_it − p_it p_itᵀ) J_it (the true Fisher, every label weighted by its
    probability, from the full Jacobian of the logits); empirical = (1/n) Σ_i g_i g_iᵀ with g_i the
    gradient of sequence i's summed NLL of its observed next tokens.
    """
    params = _params(model)

    def logits(p: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, args=(ids[None],), kwargs={"use_cache": False}).logits[0, :-1]

    size = sum(p.numel() for p in params.values())
    ggn = torch.zeros(size, size, dtype=torch.float64)
    emp = torch.zeros(size, size, dtype=torch.float64)
    for ids in rows:
        z = logits(params, ids).detach()
        jac = _flat(jacrev(logits)(params, ids), 2)  # [T-1, V, P]
        p = torch.softmax(z, dim=-1)
        for t in range(jac.shape[0]):
            jp = p[t] @ jac[t]  # [P]
            ggn += jac[t].T @ (p[t, :, None] * jac[t]) - torch.outer(jp, jp)
        # summed NLL gradient: Σ_t -(e_y - p_t)ᵀ J_t
        residual = p.clone()
        residual[torch.arange(len(ids) - 1), ids[1:]] -= 1
        g = torch.einsum("tv,tvp->p", residual, jac)
        emp += torch.outer(g, g)
    return ggn / len(rows), emp / len(rows)
