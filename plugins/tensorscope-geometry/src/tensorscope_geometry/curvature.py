"""geometry.curvature: local curvature of each token's neighbourhood from its volume growth."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field

from tensorscope_core.plugin_api import Cost, Metric, ModelView, Params, RunShape, ScalarValue, bootstrap_ci

from .fiber_bundle import FiberBundleParams
from .singularities import bootstrap_bytes
from .volume_curvature import curvature_fit, mean_log_curvature

FIBER = "geometry.fiber_bundle"
#: tokens fitted at once: the fit's float64 [rows, vol_max] arrays stay a few MiB each, whatever the vocabulary
ROW_CHUNK = 4096
#: bytes per entry of a chunk's fit at its peak: eight float64 [rows, vol_max] arrays (the radii, their masked
#: copy, log r, r^2, three centred columns or products, one centring's temporary) and four boolean masks
FIT_ENTRY_BYTES = 8 * 8 + 4


class CurvatureParams(Params):
    min_points: int = Field(20, ge=4, description="a token's first stratum needs at least this many radii "
                                                  "to be fitted (else NaN)")


class Curvature(Metric):
    """Volume-growth curvature of every token's neighbourhood, from the neighbour radii of
    ``geometry.fiber_bundle`` (same source, same range [vol_min, vol_max), read by name).

    Per token, on its first (smallest-radius) stratum, the OLS fit psi(k) = c + n log r_k + b r_k^2
    gives kappa = -6 (n + 2) b: the scalar-curvature coefficient of the reference
    (``geo_estimator``'s Ricci term, V(r) = w r^n (1 - S r^2 / (6 (n + 2)))) with the r^2 term fitted
    jointly instead of read off the log-log residuals, and the log-volume debiased to the digamma
    psi(k) (the mean log measure of a ball reaching the k-th of N uniform points) instead of log k.
    With Euclidean distances kappa is the extrinsic coefficient (3/4)(|H|^2 - 2|alpha|^2) of Karp &
    Pinsky: 3 n (n - 2) / (4 R^2) on a round n-sphere of radius R (0 on S^2, 9/(4R^2) on S^3), 0 on
    flat data; it is in 1/(distance units)^2 and includes the effect of varying sampling density.
    Per-token values are noisy (the r^2 term is small at kNN radii); ``pooled_curvature`` fits the
    mean log-radius curve of the tokens that kept one stratum (no change point) and is the steadier
    per-model number. ``pooled_curvature_scaled`` multiplies it by the squared geometric-mean radius
    at vol_max - 1, so models with differently scaled embeddings can be compared.
    """

    name = "geometry.curvature"
    supports_dispatch = True  # reads geometry.fiber_bundle's result only
    version = "1"
    summary = "per-token volume-growth (scalar-curvature) coefficient of the token embedding"
    Params = CurvatureParams
    requires_metrics = (FIBER,)
    derived_from = (FIBER,)
    fields = {
        "curvature": "[V] kappa of each token's first stratum (NaN: too few radii or not tested)",
        "fit_dimension": "[V] the dimension n of the same joint fit",
        "median_curvature": "median kappa over tokens, bootstrap 95% CI",
        "pooled_curvature": "kappa of the mean log-radius curve of single-stratum tokens (NaN if fewer than 2)",
        "pooled_dimension": "n of that pooled fit",
        "pooled_curvature_scaled": "pooled_curvature x (geometric-mean radius at vol_max - 1)^2, dimensionless",
    }

    @classmethod
    def cost(cls, params: CurvatureParams, view: ModelView, shape: RunShape) -> Cost:
        v = int(view.embed.weight.shape[0])
        fiber = FiberBundleParams()
        fit = FIT_ENTRY_BYTES * min(ROW_CHUNK, v) * fiber.vol_max
        # beside the two [V] float64 results (fiber_bundle's result arrays, which the run keeps, are its): one
        # chunk's fit, or the bootstrap of the median over up to V finite kappas (with their float64 copy)
        working = 16 * v + max(fit, 8 * v + bootstrap_bytes(v))
        return Cost(state_bytes=0, finalize_bytes=working, result_bytes=16 * v,
                    flops=float(40 * v * fiber.vol_max))

    def finalize(self) -> dict[str, Any]:
        fiber = self.deps[FIBER]
        radii = self.tensor_of(fiber, "radii")  # float32 [V, vol_max]: read in float64 a chunk of rows at a time
        n_strata = self.tensor_of(fiber, "n_strata").numpy()
        first_start = self.tensor_of(fiber, "start_volume").numpy()[:, 0]
        first_end = self.tensor_of(fiber, "end_volume").numpy()[:, 0]
        vol_min = int(fiber.params["vol_min"])
        k = np.arange(radii.shape[1], dtype=np.float64)
        chunks = [slice(lo, lo + ROW_CHUNK) for lo in range(0, radii.shape[0], ROW_CHUNK)]
        fits = [self._fit_first_strata(radii[c].double().numpy(), n_strata[c], first_start[c], first_end[c], k)
                for c in chunks]
        dimension, kappa = np.concatenate([n for n, _ in fits]), np.concatenate([b for _, b in fits])
        del fits
        finite = kappa[np.isfinite(kappa)]
        ci = bootstrap_ci(finite, np.median, seed=self.shape.seed) if finite.size else (np.nan, np.nan)
        single = (n_strata == 1) & (first_start == vol_min)  # one stratum over the whole range
        n_single = int(single.sum())
        if n_single >= 2:
            mean_log = sum(np.log(radii[c][single[c], vol_min:].double().numpy()).sum(axis=0) for c in chunks)
            mean_log = mean_log / n_single
            pooled_n, pooled_kappa = mean_log_curvature(mean_log, k[vol_min:])
            scale = float(np.exp(mean_log[-1])) ** 2
        else:
            pooled_n, pooled_kappa, scale = np.nan, np.nan, np.nan
        return {
            "curvature": torch.from_numpy(kappa), "fit_dimension": torch.from_numpy(dimension),
            "median_curvature": ScalarValue(value=float(np.median(finite)) if finite.size else np.nan,
                                            ci_low=ci[0], ci_high=ci[1], n=int(finite.size)),
            "pooled_curvature": ScalarValue(value=pooled_kappa, n=n_single),
            "pooled_dimension": ScalarValue(value=pooled_n, n=n_single),
            "pooled_curvature_scaled": ScalarValue(value=pooled_kappa * scale, n=n_single),
        }

    def _fit_first_strata(self, radii: np.ndarray, n_strata: np.ndarray, first_start: np.ndarray,
                          first_end: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, kappa) of the first stratum of each row of one chunk (float64 radii [rows, vol_max]); every row
        is fitted on its own, so chunking gives the same values as one fit over all rows."""
        columns = np.arange(radii.shape[1])[None, :]
        mask = (n_strata > 0)[:, None] & (columns >= np.nan_to_num(first_start)[:, None]) & \
            (columns < np.nan_to_num(first_end)[:, None])
        mask &= mask.sum(axis=-1, keepdims=True) >= self.params.min_points
        safe = np.where(mask, radii, 1.0)  # keep log() finite outside the fitted entries
        return curvature_fit(safe, k, mask)
