"""An independent transcription of the authors' algorithm (kb1dds/stratified_estimator,
split_geo_estimator.py), one token at a time with scipy.stats.ttest_ind and np.linalg.lstsq, plus the
dense distance computation: the oracle the vectorised, chunked implementation is compared with."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.spatial
import scipy.stats


def dense_sorted_distances(points: np.ndarray) -> np.ndarray:
    """[V, V] float64: row i holds the sorted distances from point i (scipy distance_matrix, all pairs)."""
    x = np.asarray(points, dtype=np.float64)
    return np.sort(scipy.spatial.distance_matrix(x, x), axis=1)


def _test(radii: np.ndarray, volumes: np.ndarray, ws: int, alpha: float) -> tuple[int | None, float]:
    dimvec = np.gradient(np.log(volumes)) / np.gradient(np.log(radii))
    for w in range(2 * ws, dimvec.shape[0] - 2 * ws):
        t1, t2 = dimvec[w - 2 * ws:w - ws], dimvec[w + ws:w + 2 * ws]
        t1 = t1[np.logical_and(np.abs(t1) > 1e-5, np.isfinite(t1))]
        t2 = t2[np.logical_and(np.abs(t2) > 1e-5, np.isfinite(t2))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fewer than two kept values: NaN, as in the reference
            pvalue = scipy.stats.ttest_ind(t1, t2, equal_var=False).pvalue
        if pvalue < alpha:
            return w, float(pvalue)
    return None, 1.0


def _fit(radii: np.ndarray, volumes: np.ndarray, npts: int) -> tuple[float, float]:
    a = np.column_stack((np.ones_like(radii), np.log(radii)))
    coef, rss, _, _ = np.linalg.lstsq(a, np.log(volumes), rcond=None)
    s2 = rss[0] / (len(radii) - 2) if len(radii) > 2 and rss.size else 0.0
    return float(np.exp(coef[0]) / npts * np.exp(0.5 * s2)), float(coef[1])


def estimate_stratifications(sorted_row: np.ndarray, vol_min: int, vol_max: int, npts: int, nstrat: int,
                             ws: int = 10, alpha: float = 1e-3) -> dict[str, list[float]]:
    """Per stratum: start volume, start radius, scaling, dimension, p-value (the reference's loop)."""
    radii = sorted_row[vol_min:vol_max]
    volumes = np.arange(vol_min, vol_max)
    out: dict[str, list[float]] = {"volume": [], "radius": [], "scaling": [], "dimension": [], "pvalue": []}
    lo = int(np.argmax(radii > 1e-10))
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(nstrat):
            hi = radii.shape[0]
            idx, p = _test(radii[lo:hi], volumes[lo:hi], ws, alpha / nstrat)
            if idx is not None:
                hi = idx + lo
            scaling, dim = _fit(radii[lo:hi], volumes[lo:hi], npts)
            for key, value in zip(out, (vol_min + lo, radii[lo], scaling, dim, p), strict=True):
                out[key].append(float(value))
            if idx is None:
                break
            lo = idx + lo
    return out
