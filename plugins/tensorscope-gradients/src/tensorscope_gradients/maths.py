"""The plugin's maths on plain tensors and arrays: PCGrad, TracIn, the empirical null and FDR.

Nothing here knows about models or runs, so each function is checked on its own against
the closed-form examples of metric-specs.md section 9.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

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


# -- TracIn along the path between checkpoints ---------------------------------------------------


def interpolation_weights(rates: Sequence[float], n: int) -> tuple[list[float], list[tuple[int, float, float]]]:
    """The weights of TracIn with ``n`` interpolation points per interval of consecutive checkpoints.

    Interval i runs from checkpoint i to checkpoint i + 1 and carries checkpoint i's learning rate
    eta_i, split evenly over its n + 1 sub-steps: the checkpoint itself (t = 0) and the interior
    points t = k / (n + 1), k = 1..n, each get eta_i / (n + 1) (a left Riemann sum of
    eta_i * integral_0^1 g(t) . g'(t) dt). The last checkpoint starts no interval and keeps its
    whole eta. Returns (the weight of each checkpoint, [(interval i, t, weight)] of the interior
    points in path order). With n = 0 every checkpoint keeps its eta: TracInCP.
    """
    if n < 0:
        raise ValueError(f"interpolation points must be >= 0, got {n}")
    last = len(rates) - 1
    checkpoint = [float(r) if i == last else float(r) / (n + 1) for i, r in enumerate(rates)]
    interior = [(i, k / (n + 1), float(rates[i]) / (n + 1)) for i in range(last) for k in range(1, n + 1)]
    return checkpoint, interior


# -- dispersion ---------------------------------------------------------------------------------

#: entries summed at a time by ``gini_sorted`` (bounds its scratch: 16 bytes an entry)
GINI_CHUNK = 1 << 20


def gini_sorted(x: npt.NDArray[np.floating]) -> float:
    """Gini coefficient of non-negative values sorted ascending, by the sample formula

        G = sum_i (2 i - n - 1) x_(i) / (n sum_i x_i),   i = 1..n

    (0 when all are equal, 1 - 1/n with one non-zero among n, 0.25 for [1, 2, 3, 4]); NaN for no
    values or a zero sum. Summed in float64 over chunks, so the scratch stays GINI_CHUNK entries."""
    n = len(x)
    total = weighted = 0.0
    for start in range(0, n, GINI_CHUNK):
        part = np.asarray(x[start:start + GINI_CHUNK], dtype=np.float64)
        ranks = np.arange(start + 1, start + 1 + len(part), dtype=np.float64)
        weighted += float(((2 * ranks - n - 1) * part).sum())
        total += float(part.sum())
    return weighted / (n * total) if n and total > 0 else math.nan


# -- alignment of task gradients ----------------------------------------------------------------

#: resamples or permutations evaluated at a time (bounds the [groups, chunk, N] scratch)
RESAMPLE_CHUNK = 100


@dataclass(frozen=True)
class Alignment:
    """Per group (layer) of one task pair: the cosine of the task mean gradients, its percentile
    bootstrap CI, the mean cosine of the label permutations (chance level) and the permutation p."""

    cosine: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    chance: np.ndarray
    p_value: np.ndarray


def _weighted_cosines(grams: torch.Tensor, wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """cos(sum_n wa[r, n] g_n, sum_n wb[r, n] g_n) per group and row r, from the groups' Gram
    matrices [G, N, N] of the g_n: [G, R] (NaN where a mean is zero)."""
    out = []
    for start in range(0, len(wa), RESAMPLE_CHUNK):
        a = torch.as_tensor(wa[start:start + RESAMPLE_CHUNK])
        b = torch.as_tensor(wb[start:start + RESAMPLE_CHUNK])
        ga, gb = torch.einsum("gnm,rm->grn", grams, a), torch.einsum("gnm,rm->grn", grams, b)
        ab, aa, bb = (ga * b).sum(-1), (ga * a).sum(-1), (gb * b).sum(-1)
        den = (aa.clamp(min=0) * bb.clamp(min=0)).sqrt()
        cos = torch.where(den > 0, ab / torch.where(den > 0, den, torch.ones_like(den)), torch.nan)
        out.append(cos.clamp(-1, 1).numpy())
    return np.concatenate(out, axis=1)


def _mean_weights(members: np.ndarray, n: int) -> np.ndarray:
    w = np.zeros(n)
    w[members] = 1.0 / len(members)
    return w


def task_alignment(grams: torch.Tensor, a: np.ndarray, b: np.ndarray, *, n_resamples: int, n_permutations: int,
                   level: float, seed: int) -> Alignment:
    """Alignment of tasks A and B (example indices ``a``, ``b`` into the groups' Gram matrices
    ``grams`` [G, N, N] of the per-example gradients), per group.

    - cosine: cos(mean_A g, mean_B g);
    - CI: plain percentile bootstrap, ``n_resamples`` resamples, each drawing n_A examples of A
      and n_B of B with replacement, independently; the (1 - level)/2 and (1 + level)/2 quantiles;
    - permutation test: H0 = the task labels are exchangeable over the pooled examples of A and B
      (A and B are random splits of one set of examples, so their mean gradients are aligned no
      more than chance); statistic the cosine; one-sided (upper): p = (1 + #{cos_perm >= cos}) /
      (1 + n_permutations), ``n_permutations`` random relabellings keeping n_A and n_B; ``chance``
      is the mean permuted cosine.

    Resamples and permutations are seeded by ``seed`` (two independent streams).
    """
    grams = grams.double()
    n = grams.shape[-1]
    boot_rng, perm_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    observed = _weighted_cosines(grams, _mean_weights(a, n)[None], _mean_weights(b, n)[None])[:, 0]

    def resampled(members: np.ndarray) -> np.ndarray:
        counts = boot_rng.multinomial(len(members), np.full(len(members), 1.0 / len(members)), size=n_resamples)
        w = np.zeros((n_resamples, n))
        w[:, members] = counts / len(members)
        return w

    boot = _weighted_cosines(grams, resampled(a), resampled(b))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a group whose every resample is NaN
        low, high = np.nanquantile(boot, [(1 - level) / 2, (1 + level) / 2], axis=1)
    pooled = np.concatenate([a, b])
    wa, wb = np.zeros((n_permutations, n)), np.zeros((n_permutations, n))
    for r in range(n_permutations):
        order = perm_rng.permutation(pooled)
        wa[r, order[:len(a)]] = 1.0 / len(a)
        wb[r, order[len(a):]] = 1.0 / len(b)
    perm = _weighted_cosines(grams, wa, wb)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a group whose every permutation is NaN
        hits = (perm >= observed[:, None] - TIE_TOLERANCE).sum(axis=1)
        chance = np.nanmean(perm, axis=1)
    p = np.where(np.isfinite(observed), (1 + hits) / (1 + n_permutations), np.nan)
    return Alignment(observed, low, high, chance, p)


#: permuted cosines this close below the observed one count as ties (>=): rounding of equal splits
TIE_TOLERANCE = 1e-12
