"""The Robinson-Dey-Chiang stratification test on sorted neighbour radii, vectorised over tokens.

Pure numpy/scipy functions, so the verification cases of metric-specs.md section 2 run through
the same code as ``geometry.fiber_bundle``. Conventions follow the authors' code
(``kb1dds/stratified_estimator``, ``split_geo_estimator.py``): ``radii[k]`` is the k-th sorted
distance of a token (entry 0 is the token itself) and the "volume" at ``radii[k]`` is ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import stats

#: pointwise dimensions with |value| <= this (or non-finite) are dropped before a Welch test
DIMVEC_FLOOR = 1e-5
#: radii <= this are duplicates of the token and are skipped at the start of the range
ZERO_RADIUS = 1e-10
#: tokens scanned at once (the windowed statistics take about 30 x ws x (vol_max - vol_min) bytes per token)
ROW_CHUNK = 2048


@dataclass(frozen=True)
class Strata:
    """Per token (rows) and stratum (columns, NaN beyond ``n_strata``), smallest radius first.

    ``pvalue`` of a stratum is the Welch p-value of the change point that ends it, 1.0 for the
    last stratum (no further change found), as in the reference. Tokens whose neighbourhood is
    degenerate (fewer than two distinct radii in the range) have ``n_strata == 0``.
    """

    n_strata: np.ndarray  # [T] int
    start_volume: np.ndarray  # [T, nstrat]
    start_radius: np.ndarray  # [T, nstrat]
    end_volume: np.ndarray  # [T, nstrat], exclusive
    dimension: np.ndarray  # [T, nstrat]
    scaling: np.ndarray  # [T, nstrat]
    pvalue: np.ndarray  # [T, nstrat]


def check_window(vol_min: int, vol_max: int, ws: int) -> None:
    """Refuse a range in which the scan has no window: it needs vol_max - vol_min > 4 * ws."""
    if vol_max - vol_min <= 4 * ws:
        raise ValueError(f"vol_max - vol_min = {vol_max - vol_min} <= 4 * ws = {4 * ws}: the change-point scan "
                         f"has no window and can never detect a change; raise vol_max above {vol_min + 4 * ws} "
                         "or lower ws")


def pointwise_dimension(log_r: np.ndarray, log_v: np.ndarray) -> np.ndarray:
    """np.gradient(log V) / np.gradient(log r) along the last axis (centred inside, one-sided at the ends)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.gradient(log_v, axis=-1) / np.gradient(log_r, axis=-1)


def _window_stats(dimvec: np.ndarray, ws: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, standard deviation (ddof 1) and count of the kept entries of every window of length ws."""
    windows = sliding_window_view(dimvec, ws, axis=-1)  # [T, n - ws + 1, ws]
    keep = np.isfinite(windows) & (np.abs(windows) > DIMVEC_FLOOR)
    values = np.where(keep, windows, 0.0)
    count = keep.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = values.sum(axis=-1) / count
        dev = np.where(keep, windows - mean[..., None], 0.0)
        std = np.sqrt((dev ** 2).sum(axis=-1) / (count - 1))  # two-pass: exactly 0 on a constant window
    return mean, std, count


def window_pvalues(dimvec: np.ndarray, ws: int) -> np.ndarray:
    """Welch p-value at every centre w of [2ws, n - 2ws): dimvec[w-2ws : w-ws] against dimvec[w+ws : w+2ws].

    Column j is centre ``2 * ws + j``. Windows with fewer than two kept entries give NaN (never a change).
    """
    n = dimvec.shape[-1]
    n_centres = max(n - 4 * ws, 0)
    mean, std, count = _window_stats(dimvec, ws)
    left, right = slice(0, n_centres), slice(3 * ws, 3 * ws + n_centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        result = stats.ttest_ind_from_stats(mean[:, left], std[:, left], count[:, left],
                                            mean[:, right], std[:, right], count[:, right], equal_var=False)
    return np.asarray(result.pvalue, dtype=np.float64).reshape(dimvec.shape[0], n_centres)


def loglog_fit(log_r: np.ndarray, log_v: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, OLS of log V = c + d log r over the entries where ``mask``: (c, d, residual sum of squares)."""
    m = mask.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_mean = np.where(mask, log_r, 0.0).sum(axis=-1) / m
        y_mean = np.where(mask, log_v, 0.0).sum(axis=-1) / m
        dx = np.where(mask, log_r - x_mean[:, None], 0.0)
        dy = np.where(mask, log_v - y_mean[:, None], 0.0)
        slope = (dx * dy).sum(axis=-1) / (dx * dx).sum(axis=-1)
        intercept = y_mean - slope * x_mean
        rss = (np.where(mask, dy - slope[:, None] * dx, 0.0) ** 2).sum(axis=-1)
    return intercept, slope, rss


def scaling_coefficient(intercept: np.ndarray, rss: np.ndarray, m: np.ndarray, npts: int,
                        miller: bool) -> np.ndarray:
    """exp(c) / N, times Miller's (1984) retransformation factor exp(s^2 / 2), s^2 = RSS / (m - 2).

    The reference multiplies by exp(RSS^2 / 2) (its lstsq residual is the residual *sum of squares*);
    this uses the residual variance, which is Miller's factor. m <= 2 leaves the factor at 1.
    """
    coeff = np.exp(intercept) / npts
    if miller:
        with np.errstate(divide="ignore", invalid="ignore"):
            s2 = np.where(m > 2, rss / (m - 2), 0.0)
        coeff = coeff * np.exp(0.5 * s2)
    return coeff


def stratify(radii: np.ndarray, vol_min: int, vol_max: int, *, npts: int, ws: int = 10, alpha: float = 1e-3,
             nstrat: int = 3, miller: bool = True) -> Strata:
    """The reference's ``estimate_stratifications`` for every row of ``radii``, vectorised over rows.

    ``radii``: [T, >= vol_max] sorted distances per token (entry 0 the token itself). The range
    ``k in [vol_min, vol_max)`` is scanned; after skipping zero radii, up to ``nstrat`` strata are
    found one after the other, each scan at level ``alpha / nstrat`` on the remaining larger radii.
    Rows are processed ``ROW_CHUNK`` at a time, so the windowed statistics stay small for any T.
    """
    check_window(vol_min, vol_max, ws)
    parts = [_stratify_rows(radii[lo:lo + ROW_CHUNK], vol_min, vol_max, npts, ws, alpha, nstrat, miller)
             for lo in range(0, max(len(radii), 1), ROW_CHUNK)]
    return Strata(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(Strata)})


def _stratify_rows(radii: np.ndarray, vol_min: int, vol_max: int, npts: int, ws: int, alpha: float, nstrat: int,
                   miller: bool) -> Strata:
    r = np.asarray(radii, dtype=np.float64)[:, vol_min:vol_max]
    n_tok, n = r.shape
    with np.errstate(divide="ignore"):
        log_r = np.log(r)
    log_v = np.broadcast_to(np.log(np.arange(vol_min, vol_max, dtype=np.float64)), r.shape)
    full = pointwise_dimension(log_r, log_v)
    with np.errstate(divide="ignore", invalid="ignore"):
        forward = np.append(np.diff(log_v, axis=-1) / np.diff(log_r, axis=-1), np.full((n_tok, 1), np.nan), axis=-1)

    shape = (n_tok, nstrat)
    out = {key: np.full(shape, np.nan) for key in ("start_volume", "start_radius", "end_volume", "dimension",
                                                     "scaling", "pvalue")}
    n_strata = np.zeros(n_tok, dtype=np.int64)
    start = np.argmax(r > ZERO_RADIUS, axis=-1)  # the reference's argmax: 0 when every radius is zero
    active = (r[:, -1] > ZERO_RADIUS) & (start <= n - 2)  # at least two distinct radii to fit
    columns = np.arange(n)
    for s in range(nstrat):
        rows = np.flatnonzero(active)
        if rows.size == 0:
            break
        c = start[rows]
        dimvec = full[rows].copy()
        dimvec[np.arange(rows.size), c] = forward[rows, c]  # the segment's first point is one-sided
        p = window_pvalues(dimvec, ws)  # column j: centre 2ws + j of the whole range
        centres = 2 * ws + np.arange(p.shape[-1])
        allowed = centres[None, :] >= (c + 2 * ws)[:, None]
        hit = allowed & (p < alpha / nstrat)
        found = hit.any(axis=-1)
        first = np.argmax(hit, axis=-1)
        end = np.where(found, centres[first], n)
        mask = (columns[None, :] >= c[:, None]) & (columns[None, :] < end[:, None])
        intercept, slope, rss = loglog_fit(log_r[rows], log_v[rows], mask)
        out["start_volume"][rows, s] = vol_min + c
        out["start_radius"][rows, s] = r[rows, c]
        out["end_volume"][rows, s] = vol_min + end
        out["dimension"][rows, s] = slope
        out["scaling"][rows, s] = scaling_coefficient(intercept, rss, mask.sum(axis=-1), npts, miller)
        out["pvalue"][rows, s] = np.where(found, p[np.arange(rows.size), first], 1.0)
        n_strata[rows] += 1
        active[rows] = found
        start[rows] = np.where(found, end, c)
    return Strata(n_strata=n_strata, **out)


@dataclass(frozen=True)
class Verdicts:
    """Per token p-values of the two nulls (NaN: not tested) before correction across tokens.

    ``manifold_p``: the smallest change-point p-value of the token (1.0 when no change was found;
    this is ``min(output['pvalues'])`` of the reference's examples).
    ``fiber_p``: the smallest p-value among the changes after which the dimension *increases*
    (1.0 if none): a slope increase contradicts the fiber-bundle null, a decrease is consistent
    with it. A change that ends the last stratum allowed (``nstrat`` reached) has no stratum after
    it to compare with, so it counts for ``manifold_p`` only.
    """

    manifold_p: np.ndarray
    fiber_p: np.ndarray


def verdicts(strata: Strata) -> Verdicts:
    tested = strata.n_strata > 0
    manifold = np.where(np.isfinite(strata.pvalue), strata.pvalue, 1.0).min(axis=-1, initial=1.0)
    rise = strata.dimension[:, 1:] > strata.dimension[:, :-1]  # NaN comparisons are False
    fiber = np.where(rise, strata.pvalue[:, :-1], 1.0).min(axis=-1, initial=1.0)
    return Verdicts(manifold_p=np.where(tested, manifold, np.nan), fiber_p=np.where(tested, fiber, np.nan))
