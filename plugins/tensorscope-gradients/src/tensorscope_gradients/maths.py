"""The plugin's maths on plain tensors and arrays: PCGrad, TracIn, the empirical null and FDR.

Nothing here knows about models or runs, so each function is checked on its own against
the closed-form examples of metric-specs.md section 9.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
from scipy import stats

MAD_TO_SD = 1.482602218505602  # 1 / Phi^-1(3/4): the MAD of a normal sample times this estimates its SD


def pcgrad(gram: torch.Tensor, order: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """PCGrad (Yu et al. 2020) of task gradients g_1..g_T, from their Gram matrix ``gram`` [T, T]
    (g_i . g_j): the projected gradients are combinations of the originals, so the metric never
    needs the [T, P] gradients themselves.

    For each task i, over the other tasks j in ``order``: if g_i . g_j < 0 (with the
    *current* g_i and the *original* g_j), g_i <- g_i - (g_i . g_j / ||g_j||^2) g_j, as in
    the reference ``PCGrad_tf.py``. Returns C [T, T] (float64) with g_i^PC = sum_t C[i, t] g_t
    (projected = C @ grads) and a [T, T] boolean matrix, entry (i, j) true when g_i was
    projected against g_j. The PCGrad update is the sum of the projected rows.
    """
    gram = gram.double()
    coef = torch.eye(len(gram), dtype=torch.float64)
    hit = torch.zeros(len(gram), len(gram), dtype=torch.bool)
    for i in range(len(gram)):
        for j in order:
            if j == i:
                continue
            dot = float(coef[i] @ gram[:, j])
            norm2 = float(gram[j, j])
            if dot < 0 and norm2 > 0:
                coef[i, j] -= dot / norm2
                hit[i, j] = True
    return coef, hit


def quadratic_norm(coef: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """||sum_t coef[..., t] g_t|| from the Gram matrix of the g_t (clamped at 0 against rounding)."""
    return torch.einsum("...i,ij,...j->...", coef, gram, coef).clamp(min=0).sqrt()


def tracin(train_grads: Sequence[torch.Tensor], test_grads: Sequence[torch.Tensor],
           learning_rates: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """TracInCP (Pruthi et al. 2020) from per-checkpoint gradients.

    ``train_grads[c]`` [n_train, P] and ``test_grads[c]`` [n_test, P] are the per-example
    loss gradients at checkpoint c, taken with learning rate ``learning_rates[c]``.
    Returns (influence [n_train, n_test] = sum_c eta_c G_train,c G_test,c^T,
    self-influence [n_train] = sum_c eta_c ||g_train,c||^2), in float64.
    """
    dots = [a.double() @ b.double().T for a, b in zip(train_grads, test_grads, strict=True)]
    selfs = [a.double().pow(2).sum(dim=1) for a in train_grads]
    return combine_checkpoints(dots, selfs, learning_rates)


def combine_checkpoints(dots: Sequence[torch.Tensor], self_dots: Sequence[torch.Tensor],
                        learning_rates: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_c eta_c D_c and sum_c eta_c s_c: the TracInCP sums from per-checkpoint dot products."""
    if not (len(dots) == len(self_dots) == len(learning_rates)) or not dots:
        raise ValueError("need one dot-product matrix, one self-dot vector and one learning rate per checkpoint")
    influence = sum((float(lr) * d.double() for lr, d in zip(learning_rates, dots, strict=True)),
                    torch.zeros_like(dots[0], dtype=torch.float64))
    self_influence = sum((float(lr) * s.double() for lr, s in zip(learning_rates, self_dots, strict=True)),
                         torch.zeros_like(self_dots[0], dtype=torch.float64))
    return influence, self_influence


def robust_null(values: npt.ArrayLike) -> tuple[float, float]:
    """Center and scale of an empirical null: the median and 1.4826 x the median absolute
    deviation (Efron 2004's robust fit of the central part); the sample SD when the MAD is 0.
    NaN when fewer than 3 finite values or no spread at all."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) < 3:
        return float("nan"), float("nan")
    center = float(np.median(x))
    scale = MAD_TO_SD * float(np.median(np.abs(x - center)))
    if not scale > 0:
        scale = float(np.std(x, ddof=1))
    return center, (scale if scale > 0 else float("nan"))


def null_p_values(values: npt.ArrayLike, center: float, scale: float, tail: str) -> np.ndarray:
    """One-sided p-values of ``values`` under N(center, scale^2): tail 'lower' or 'upper'."""
    z = (np.asarray(values, dtype=np.float64) - center) / scale
    return stats.norm.cdf(z) if tail == "lower" else stats.norm.sf(z)


def bh(p_values: npt.ArrayLike) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (scipy.stats.false_discovery_control); NaN kept."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        out[finite] = stats.false_discovery_control(p[finite], method="bh")
    return out


def fisher_z(cos: npt.ArrayLike) -> np.ndarray:
    """atanh of cosines clipped to (-1, 1): spreads the tails so a normal null fits better."""
    return np.arctanh(np.clip(np.asarray(cos, dtype=np.float64), -1 + 1e-12, 1 - 1e-12))
