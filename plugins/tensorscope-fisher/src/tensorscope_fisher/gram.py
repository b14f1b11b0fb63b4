"""The spectrum of an empirical Fisher block F = GᵀG / n from the n x n Gram matrix G Gᵀ / n.

For per-example gradients G [n, p] with n ≪ p, ``GᵀG / n`` (p x p) and ``G Gᵀ / n`` (n x n) have
the same nonzero eigenvalues (G = U Σ Vᵀ: both are Σ² / n on their diagonal), so the spectrum costs
O(n² p + n³) and n² memory, never p².
"""

from __future__ import annotations

import torch


def gram_eigenvalues(grads: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of GᵀG / n (its n largest, which hold all nonzero ones), descending, float64, ≥ 0."""
    g = grads.double()
    return gram_spectrum(g @ g.T, g.shape[0])


def gram_spectrum(gram: torch.Tensor, n: int) -> torch.Tensor:
    """Eigenvalues of the Gram matrix ``G Gᵀ`` [n, n] divided by n, descending, float64, ≥ 0."""
    return torch.linalg.eigvalsh(gram.double() / n).flip(0).clamp_min(0.0)


def nonzero_part(eigenvalues: torch.Tensor, n: int, p: int, eps: float) -> torch.Tensor:
    """The eigenvalues above the numerical-rank tolerance, all of them (zeros) for a zero spectrum.

    The eigenvalues are squared singular values of G / √n, so numpy's ``matrix_rank`` rule
    (σ > max(n, p) · eps · σ_max, ``eps`` the machine epsilon of the gradients' dtype) becomes
    λ > (max(n, p) · eps)² · λ_max; it is raised to n · eps64 · λ_max, the round-off of the
    float64 eigensolver on the Gram matrix.
    """
    if eigenvalues.numel() == 0 or float(eigenvalues.max()) == 0.0:
        return eigenvalues
    rel = max((max(n, p) * eps) ** 2, n * torch.finfo(torch.float64).eps)
    return eigenvalues[eigenvalues > rel * eigenvalues.max()]
