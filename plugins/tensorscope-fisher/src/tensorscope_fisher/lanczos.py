"""Top eigenpairs of a symmetric operator given only its matrix-vector product.

Lanczos with selective reorthogonalisation (Parlett & Scott, "The Lanczos algorithm with
selective orthogonalization", Math. Comp. 33, 1979). Plain Lanczos loses orthogonality
exactly in the directions of Ritz vectors that have converged, which then reappear as
spurious copies ("ghosts"). Selective reorthogonalisation keeps the basis semi-orthogonal
at a fraction of full reorthogonalisation's cost: each new Lanczos vector is
orthogonalised against the *good* Ritz vectors only, those whose residual bound
``beta_j |s_ji|`` (the last component of the Ritz vector in the tridiagonal's eigenbasis
times the last off-diagonal) has fallen below ``sqrt(eps) ||T||``.

Eigenvalues are the largest *algebraic* ones (``eigsh(which='LA')``), so a Hessian's
negative eigenvalues come last. ``residual_norms`` are the true ``||A v - lambda v||``, not
the Lanczos estimate: A v is the same combination of the computed products A q_j as v is of
the basis vectors q_j (A is linear), so it costs no further product, only a second store.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

Matvec = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LanczosResult:
    """``eigenvalues`` [k] descending, ``eigenvectors`` [dim, k] (unit columns),
    ``residual_norms`` [k] = ``||A v_i - lambda_i v_i||``, the number of Lanczos ``iterations``
    (products of A) and whether every pair met ``tol`` (Lanczos residual bound at most
    ``tol * ||T||``)."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residual_norms: torch.Tensor
    iterations: int
    converged: bool


def top_eigenpairs(matvec: Matvec, dim: int, k: int, *, max_iter: int = 200, tol: float = 1e-8, seed: int = 0,
                   dtype: torch.dtype = torch.float64, device: torch.device | str | None = None,
                   precision: float | None = None) -> LanczosResult:
    """The ``k`` largest eigenpairs of the symmetric ``dim x dim`` operator behind ``matvec``.

    ``matvec(v)`` takes and returns a vector [dim] of ``dtype`` on ``device``. The start
    vector is Gaussian from ``seed``. Stops when the top ``k`` Ritz pairs' residual bounds
    are at most ``tol * ||T||`` (``||T||`` the largest Ritz value in magnitude), after
    ``max_iter`` products, or when the Krylov space exhausts ``dim``. An invariant subspace
    found early (``beta = 0``) restarts with a fresh random vector orthogonal to the basis.
    ``precision`` is the relative accuracy of ``matvec`` (None: ``dtype``'s machine epsilon):
    Ritz vectors count as good below ``sqrt(precision) ||T||``. A product computed in lower
    precision than ``dtype`` (a float32 model, or float32 norms inside a float64 model) must
    say so, or its rounding noise keeps every bound above the threshold, no vector is ever
    reorthogonalised against and spurious copies of converged eigenvalues appear.
    Memory: the basis and the products, ``2 x (iterations + 1) x dim`` values.
    """
    if not 1 <= k <= dim:
        raise ValueError(f"k must lie in 1..dim={dim}, got {k}")
    if max_iter < k:
        raise ValueError(f"max_iter ({max_iter}) must be at least k ({k})")
    gen = torch.Generator().manual_seed(seed)
    rows = min(max_iter, dim) + 1
    basis = _Rows(dim, dtype, device, rows)
    products = _Rows(dim, dtype, device, rows)  # A q_j as computed: A y for any y = Q s is their combination
    basis.append(_unit(torch.randn(dim, generator=gen, dtype=dtype).to(device)))
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples basis[j] and basis[j + 1]
    good = torch.zeros(dim, 0, dtype=dtype, device=device)
    n_good = -1
    eps = float(torch.finfo(dtype).eps)
    good_below = math.sqrt(max(eps, precision or 0.0))
    theta = np.zeros(0)
    s = np.zeros((0, 0))
    converged = False
    for j in range(min(max_iter, dim)):
        w = matvec(basis[j]).to(dtype)
        products.append(w)
        if j > 0:
            w = w - betas[j - 1] * basis[j - 1]
        alpha = float(torch.dot(basis[j], w))
        w = w - alpha * basis[j]
        alphas.append(alpha)
        theta, s = eigh_tridiagonal(np.array(alphas), np.array(betas[:j]))
        w = _orthogonalise(w, good)
        beta = float(torch.linalg.vector_norm(w))
        norm_t = max(float(np.abs(theta).max()), eps)
        bounds = beta * np.abs(s[-1])
        top = np.argsort(theta)[::-1][:k]
        if j + 1 >= k and bool((bounds[top] <= tol * norm_t).all()):
            converged = True
            break
        if j + 1 == dim:
            converged = True  # the Krylov space is the whole space: T is A in the basis
            break
        # Parlett-Scott: the Ritz vectors whose bound is below sqrt(eps)||T|| have converged;
        # the basis loses orthogonality in their directions, so the next vectors are kept off them.
        is_good = bounds <= good_below * norm_t
        if int(is_good.sum()) != n_good:
            n_good = int(is_good.sum())
            good = _combine(basis.first(j + 1), s[:, is_good])
            w = _orthogonalise(w, good)
            beta = float(torch.linalg.vector_norm(w))
        if beta <= eps * norm_t * math.sqrt(dim):  # invariant subspace: restart off the basis
            w = torch.randn(dim, generator=gen, dtype=dtype).to(device)
            w = _orthogonalise(w, basis.first(j + 1).T, passes=2)
            betas.append(0.0)
        else:
            betas.append(beta)
        basis.append(_unit(w))
    order = np.argsort(theta)[::-1][:k]
    n = len(alphas)
    vectors = _combine(basis.first(n), s[:, order])
    applied = _combine(products.first(n), s[:, order])  # A (Q s) = (A Q) s, no further products
    norms = torch.linalg.vector_norm(vectors, dim=0, keepdim=True)
    vectors, applied = vectors / norms, applied / norms
    values = torch.as_tensor(theta[order].copy(), dtype=dtype, device=device)
    residuals = torch.linalg.vector_norm(applied - vectors * values, dim=0)
    return LanczosResult(values, vectors, residuals, n, converged)


class _Rows:
    """Vectors appended one at a time into a [capacity, dim] buffer that doubles when full (up to
    ``limit`` rows), so the first n are one [n, dim] view: combining them copies nothing."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str | None, limit: int) -> None:
        self.limit = limit
        self.data = torch.empty(min(32, limit), dim, dtype=dtype, device=device)
        self.n = 0

    def append(self, v: torch.Tensor) -> None:
        if self.n == self.data.shape[0]:
            grown = torch.empty(min(2 * self.n, self.limit), self.data.shape[1], dtype=self.data.dtype,
                                device=self.data.device)
            grown[:self.n] = self.data
            self.data = grown
        self.data[self.n] = v
        self.n += 1

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]

    def first(self, n: int) -> torch.Tensor:
        return self.data[:n]


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.linalg.vector_norm(v)


def _combine(rows: torch.Tensor, s: np.ndarray) -> torch.Tensor:
    """rows^T S: [dim, columns of s] combinations of the vectors ``rows`` [len(s), dim]."""
    # (S^T rows)^T: a row-major product over the contiguous rows (rows.T @ S is ~10x slower on the CPU)
    return (torch.as_tensor(np.ascontiguousarray(s.T), dtype=rows.dtype, device=rows.device) @ rows).T


def _orthogonalise(w: torch.Tensor, vectors: torch.Tensor, passes: int = 1) -> torch.Tensor:
    """w minus its projection on the (near-orthonormal) columns of ``vectors`` (``passes`` times)."""
    for _ in range(passes if vectors.shape[1] else 0):
        w = w - vectors @ (vectors.T @ w)
    return w
