"""Dense float64 references for the Lanczos metrics: the GGN from the explicit Jacobian of the
logits, the Hessian from double backward, over one flat parameter vector."""

from __future__ import annotations

import torch
from torch.func import functional_call, jacrev


def _flat_call(model: torch.nn.Module, ids: torch.Tensor):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def logits(flat: torch.Tensor) -> torch.Tensor:
        parts = torch.split(flat, sizes)
        w = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return functional_call(model, w, args=(), kwargs={"input_ids": ids, "use_cache": False}).logits
    return theta, logits


def dense_ggn(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(1/n) sum_i sum_t J_it^T (diag p - p p^T) J_it with J from jacrev, next-token targets, unpadded rows."""
    theta, logits = _flat_call(model, ids)
    jac = jacrev(lambda f: logits(f)[:, :-1])(theta)  # [n, T-1, V, P]
    with torch.no_grad():
        p = torch.softmax(logits(theta)[:, :-1], dim=-1)
    h = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]  # [n, T-1, V, V]
    return torch.einsum("ntvp,ntvw,ntwq->pq", jac, h, jac) / ids.shape[0]


def dense_hessian(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Hessian of (1/n) sum_i sum_t CE(logits_it, ids_i,t+1) by reverse-over-reverse autograd."""
    theta, logits = _flat_call(model, ids)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        z = logits(flat)[:, :-1]
        return torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), ids[:, 1:].reshape(-1),
                                                 reduction="sum") / ids.shape[0]
    return torch.autograd.functional.hessian(loss, theta, vectorize=True)
