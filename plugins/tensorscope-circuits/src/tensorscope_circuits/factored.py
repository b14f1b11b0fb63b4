"""Pure maths of low-rank QK / OV circuits (row-vector convention, x @ W, as TransformerLens).

Every d x d circuit of a head is a product X @ Y of a [d, r] and an [r, d] factor (r = d_head),
and every full circuit through the embedding E [V, d] and unembedding U [V, d] a product of
[V, r] and [r, V] factors. Norms, composition scores and eigenvalues are computed from r x r
and d x d Gram matrices, so neither a d x d circuit per head pair nor any V x V (or V x r)
matrix is ever formed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x over the last two dims ([..., n, r] -> [..., r, r])."""
    return x.transpose(-2, -1) @ x


def product_norm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||x @ y||_F for x [..., d, r], y [..., r, e], from tr((x^T x)(y y^T))."""
    return (gram(x) * (y @ y.transpose(-2, -1))).sum(dim=(-2, -1)).clamp_min(0).sqrt()


def factored_svdvals(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Singular values of x @ y (x [..., d, r], y [..., r, d]) from the r x r core R_x R_y^T."""
    rx = torch.linalg.qr(x, mode="r").R
    ry = torch.linalg.qr(y.transpose(-2, -1), mode="r").R
    return torch.linalg.svdvals(rx @ ry.transpose(-2, -1))


#: per layer, a head factor pair (in [H, d, r], out [H, r, d]) of the heads of that layer
LayerFactors = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def composition_scores(left: LayerFactors, right: LayerFactors, n_layers: int) -> torch.Tensor:
    """TransformerLens composition scores ||L R||_F / (||L||_F ||R||_F) for every head pair.

    ``left(l)`` gives layer l's OV factors (W_V, W_O), so head i's L = W_V[i] W_O[i];
    ``right(l)`` its factors (P, Q) of R = P Q (W_Q, W_K^T for Q-, W_K, W_Q^T for K-, W_V, W_O
    for V-composition). Returns [L, H, L, H], zero unless layer(i) < layer(j). With
    M = W_O[i] P[j], ||W_V M Q||_F^2 = tr(M^T G_V M G_Q) (G_V = W_V^T W_V, G_Q = Q Q^T): every
    product is r x r, and only two layers' factors are held at a time.
    """
    right_gram, right_norm = [], []
    for layer in range(n_layers):
        p, q = right(layer)
        right_gram.append(q @ q.transpose(-2, -1))
        right_norm.append(product_norm(p, q))
    heads = right_norm[0].shape[0]
    out = torch.zeros(n_layers, heads, n_layers, heads, dtype=right_norm[0].dtype)
    for l1 in range(n_layers - 1):
        a, b = left(l1)
        g_a, left_norm = gram(a), product_norm(a, b)
        for l2 in range(l1 + 1, n_layers):
            m = torch.einsum("ird,jds->ijrs", b, right(l2)[0])  # [H, H, r, r]
            num = ((g_a[:, None] @ m) * (m @ right_gram[l2][None])).sum(dim=(-2, -1)).clamp_min(0).sqrt()
            out[l1, :, l2] = num / (left_norm[:, None] * right_norm[l2][None])
    return out


def copying_scores(eigenvalues: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From complex eigenvalues [..., r]: (sum Re(l) / sum |l|, sum max(Re(l), 0) / sum |l|).

    The first is Elhage et al.'s copying statistic (1 when every eigenvalue is positive real,
    -1 when every one is negative, near 0 for rotations); the second the fraction of the
    eigenvalue mass that is positive real, in [0, 1]. NaN for a zero matrix.
    """
    mass = eigenvalues.abs().sum(dim=-1)
    real = eigenvalues.real
    return real.sum(dim=-1) / mass, real.clamp_min(0).sum(dim=-1) / mass


def rotary_matrix(inv_freq: torch.Tensor, d_head: int, delta: int, scaling: float = 1.0) -> torch.Tensor:
    """R(delta) [d_head, d_head] with (q R(delta)) . k = the rotary score of a query at position
    i and a key at j = i - delta (Hugging Face rotate_half pairing: dim m with m + rotary_dim/2,
    angle delta * inv_freq[m]; dims past rotary_dim are not rotated; ``scaling`` is the
    attention scaling multiplying cos and sin). R(0) = scaling^2 * I on the rotary dims."""
    half = inv_freq.shape[0]
    r = torch.eye(d_head, dtype=torch.float64)
    angle = delta * inv_freq.double()
    idx = torch.arange(half)
    r[idx, idx] = r[idx + half, idx + half] = angle.cos()
    r[idx, idx + half] = angle.sin()
    r[idx + half, idx] = -angle.sin()
    r[: 2 * half, : 2 * half] *= scaling ** 2
    return r
