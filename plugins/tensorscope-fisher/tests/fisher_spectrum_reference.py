"""Brute-force float64 reference for fisher.spectrum: per-example gradients by a loop, the blocks sliced by
hand per architecture, the p x p Fisher built and diagonalised (eigh)."""

from __future__ import annotations

import torch


def example_grads(model: torch.nn.Module, rows: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """∇ of each sequence's summed next-token NLL (observed labels), one unpadded sequence at a time."""
    out = []
    for ids in rows:
        model.zero_grad()
        logp = torch.log_softmax(model(ids[None]).logits[0], dim=-1)
        (-logp[torch.arange(len(ids) - 1), ids[1:]].sum()).backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    return out


def head_vector(family: str, grads: dict[str, torch.Tensor], layer: int, head: int, n_heads: int,
                n_kv: int, d_head: int) -> torch.Tensor:
    """The head's entries, sliced by hand from the architecture's own layout."""
    s = slice(head * d_head, (head + 1) * d_head)
    if family == "gpt2":  # Conv1D: c_attn [d, 3d] = [Q | K | V] columns, c_proj [d, d] rows are head inputs
        pre, d = f"transformer.h.{layer}.attn.", n_heads * d_head
        w, b = grads[pre + "c_attn.weight"], grads[pre + "c_attn.bias"]
        cols = torch.cat([torch.arange(d)[s] + k * d for k in range(3)])
        return torch.cat([w[:, cols].flatten(), b[cols], grads[pre + "c_proj.weight"][s].flatten()])
    pre = f"model.layers.{layer}.self_attn."  # Linear [out, in]; GQA: query head h reads kv head h // group
    kv = head // (n_heads // n_kv)
    s_kv = slice(kv * d_head, (kv + 1) * d_head)
    return torch.cat([grads[pre + "q_proj.weight"][s].flatten(), grads[pre + "k_proj.weight"][s_kv].flatten(),
                      grads[pre + "v_proj.weight"][s_kv].flatten(), grads[pre + "o_proj.weight"][:, s].flatten()])


def mlp_vector(family: str, grads: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    prefix = f"transformer.h.{layer}.mlp." if family == "gpt2" else f"model.layers.{layer}.mlp."
    return torch.cat([g.flatten() for n, g in grads.items() if n.startswith(prefix)])


def dense_spectrum(vectors: list[torch.Tensor]) -> torch.Tensor:
    """Eigenvalues (descending) of the explicitly built p x p F = (1/n) Σ g gᵀ."""
    g = torch.stack(vectors).double()
    fisher = g.T @ g / g.shape[0]
    return torch.linalg.eigvalsh(fisher).flip(0)
