"""Capacity of a Kronecker-factored Fisher A ⊗ G from the factors' eigenvalues, never materialising A ⊗ G.

The eigenvalues of A ⊗ G are the products a_i g_j of the factors' eigenvalues, so

- trace(A ⊗ G) = tr A · tr G
- logdet(A ⊗ G + λI) = Σ_ij log(a_i g_j + λ); at λ = 0 this is dim(G) logdet A + dim(A) logdet G
- cond(A ⊗ G + λI) = (a_max g_max + λ) / (a_min g_min + λ)

with λ the Tikhonov damping added to the Kronecker product (not to the factors). Eigenvalues of the
factors are clipped at 0 (round-off of PSD matrices).
"""

from __future__ import annotations

import math

import torch

CHUNK = 1 << 20  # products summed per step of the damped log-det: bounds the temporary at 8 MiB


def factor_eigenvalues(factor: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (ascending, float64, clipped at 0) of a symmetric PSD factor."""
    return torch.linalg.eigvalsh(factor.double()).clamp_min(0.0)


def kron_capacity(eig_a: torch.Tensor, eig_g: torch.Tensor, damping: float) -> dict[str, float]:
    """trace, logdet, cond, eigmax and eigmin of A ⊗ G (+ damping · I for logdet and cond).

    ``eigmax``/``eigmin`` are those of the undamped A ⊗ G; ``logdet`` is ``-inf`` and ``cond``
    ``inf`` when the undamped product is singular and ``damping`` is 0 (``nan`` cond when it is 0).
    """
    a, g = eig_a.double().clamp_min(0.0), eig_g.double().clamp_min(0.0)
    eigmax, eigmin = float(a.max() * g.max()), float(a.min() * g.min())
    if damping == 0.0:
        logdet = float(g.numel() * a.log().sum() + a.numel() * g.log().sum()) if eigmin > 0 else -math.inf
    else:
        rows = max(1, CHUNK // g.numel())
        logdet = sum(float(torch.log(a[i:i + rows, None] * g[None, :] + damping).sum())
                     for i in range(0, a.numel(), rows))
    low = eigmin + damping
    cond = (eigmax + damping) / low if low > 0 else (math.nan if eigmax == 0 else math.inf)
    return {"trace": float(a.sum() * g.sum()), "logdet": logdet, "cond": cond, "eigmax": eigmax, "eigmin": eigmin}
