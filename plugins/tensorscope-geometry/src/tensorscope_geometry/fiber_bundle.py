"""geometry.fiber_bundle: the Robinson-Dey-Chiang (2025) test of the manifold and fiber-bundle nulls per token."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator

from tensorscope_core.plugin_api import (
    Cost,
    Metric,
    ModelView,
    Params,
    PreparedData,
    RunShape,
    block_saved_bytes,
    fdr_bh,
)

from .neighbours import MARGIN, knn_radii
from .strata import ROW_CHUNK, check_window, stratify, verdicts
from .token_points import Source, source_reason, token_points

#: tokens fed at once by ``token_points`` for source='resid' (its default batch)
TOKEN_BATCH = 1024


class FiberBundleParams(Params):
    source: Source = Field("embed", description="the token rows tested: 'embed' (input embedding), 'unembed' "
                                                "(output embedding) or 'resid' (residual stream at `layer` of "
                                                "each token fed alone)")
    layer: int | None = Field(None, ge=0, description="block whose input is used when source='resid' "
                                                      "(n_layers: the last block's output)")
    vol_min: int = Field(10, ge=1, description="smallest neighbour count (volume) in the fit")
    vol_max: int = Field(100, ge=2, description="one past the largest neighbour count; the reference CLI's 50 "
                                                "leaves no scan window with ws=10 and is refused")
    ws: int = Field(10, ge=1, description="window size of the sliding Welch t-test")
    alpha: float = Field(1e-3, gt=0, lt=1, description="false-alarm rate per token; each scan uses alpha/nstrat")
    nstrat: int = Field(3, ge=1, description="largest number of strata looked for per token")
    miller: bool = Field(True, description="Miller retransformation factor on the scaling coefficient")
    fdr: float = Field(1e-3, gt=0, lt=1, description="Benjamini-Hochberg false-discovery rate across tokens")
    chunk_size: int = Field(512, ge=1, description="query rows per distance block; the block holds "
                                                    "chunk_size x V float32")

    @model_validator(mode="after")
    def _window_can_detect(self) -> FiberBundleParams:
        check_window(self.vol_min, self.vol_max, self.ws)
        return self


def _vocab(view: ModelView) -> int:
    return int(view.embed.weight.shape[0])


def result_bytes(params: FiberBundleParams, v: int) -> int:
    """Bytes of the arrays a run keeps from the result: float32 radii [V, vol_max], the int64 [V] stratum
    counts, six float64 [V, nstrat] stratum arrays and six float64 [V] verdict arrays."""
    return v * (4 * params.vol_max + 8 + 6 * 8 * params.nstrat + 6 * 8)


def _points_bytes(params: FiberBundleParams, view: ModelView, v: int) -> int:
    """The token rows held through finalize beyond the weights: with source='resid' the captured rows and
    their concatenation ([V, d] each), with 'embed' / 'unembed' the weight's loaded tensor where a dispatched
    model offloaded it (``weight_of``), and a float32 copy of them for the search unless already float32."""
    if params.source == "resid":
        rows = 2 * v * view.d_model * view.dtype_bytes
    else:
        module = view.embed if params.source == "embed" else view.unembed
        rows = view.loaded_bytes(module) if module is not None else 0
    return rows + (4 * v * view.d_model if view.dtype_bytes != 4 else 0)


def _forward_bytes(params: FiberBundleParams, view: ModelView, v: int) -> int:
    """source='resid': the one-token forwards, TOKEN_BATCH tokens at a time, each stopped where the stream
    is read (``token_points``): one block's working tensors, no logits."""
    return block_saved_bytes(view, min(TOKEN_BATCH, v), 1) if params.source == "resid" else 0


def _candidate_bytes(params: FiberBundleParams, v: int) -> int:
    """The neighbour search besides its distance block: per chunk the top candidates' float32 values,
    int64 indices and float64 distances with their sorted copy [chunk, vol_max + MARGIN]."""
    rows, take = min(params.chunk_size, v), min(params.vol_max + MARGIN, v)
    return (4 + 8 + 2 * 8) * rows * take


def _stratify_bytes(params: FiberBundleParams, v: int) -> int:
    """The stratification, after the search: ``strata.ROW_CHUNK`` tokens' windowed statistics (about
    30 x ws x (vol_max - vol_min) bytes a token), each chunk's stratum arrays and their concatenation
    (2 x (6 float64 + 1 int64) [V, nstrat]), then the result arrays."""
    scan = 30 * params.ws * (params.vol_max - params.vol_min) * min(ROW_CHUNK, v)
    return scan + 2 * v * (6 * 8 * params.nstrat + 8) + result_bytes(params, v)


class FiberBundle(Metric):
    """The test of Robinson, Dey & Chiang, "Token Embeddings Violate the Manifold Hypothesis"
    (arXiv:2504.01002, 2025), as in the authors' code (kb1dds/stratified_estimator), for every token.

    For token i, r_k is its k-th nearest-neighbour distance (Euclidean, float32 coordinates,
    distances of the chosen neighbours recomputed in float64; the reference rounds coordinates to
    float16), k in [vol_min, vol_max), and V_k = k. Pointwise dimensions
    np.gradient(log V) / np.gradient(log r) are scanned with a sliding Welch t-test (windows
    [w-2ws, w-ws) against [w+ws, w+2ws), entries |x| <= 1e-5 or non-finite dropped); the first
    w with p < alpha/nstrat ends a stratum and the scan restarts there, up to ``nstrat`` strata.
    Each stratum gets an OLS fit log V = c + d log r: local dimension d and scaling coefficient
    exp(c)/V (times Miller's factor exp(s^2/2), s^2 the residual variance; the reference uses
    exp(RSS^2/2)).

    Verdicts per token: the manifold null is rejected by any change point (p-value: the smallest
    change-point p); the fiber-bundle null by a change after which the dimension increases (a
    decrease is consistent with a fiber bundle). Both p-values are Benjamini-Hochberg adjusted
    across tokens (``fdr``). Failing to reject is uninformative. Neighbours are found in chunks of
    ``chunk_size`` query rows (never a V x V matrix), exactly (see ``neighbours.knn_radii``).
    The tokens are the rows of the input embedding (``source="embed"``), of the unembedding
    (``"unembed"``), or the residual stream entering block ``layer`` when each token is fed alone
    at position 0 (``"resid"``).
    """

    name = "geometry.fiber_bundle"
    supports_dispatch = True  # reads the token rows onloaded (view.weight_of) or through whole forwards
    version = "1"
    summary = "per-token manifold / fiber-bundle hypothesis test of the token embedding (Robinson et al. 2025)"
    Params = FiberBundleParams
    artifacts = ("weights",)
    fields = {
        "radii": "[V, vol_max] sorted neighbour distances r_0..r_{vol_max-1} (r_0 = 0, the token itself)",
        "n_strata": "[V] strata found per token (0: degenerate neighbourhood, not tested)",
        "dimension": "[V, nstrat] local dimension of each stratum, smallest radius first (NaN: none)",
        "start_volume": "[V, nstrat] neighbour count k at which each stratum starts",
        "end_volume": "[V, nstrat] neighbour count one past each stratum's end",
        "start_radius": "[V, nstrat] radius at which each stratum starts",
        "scaling": "[V, nstrat] scaling coefficient exp(c)/V of each stratum",
        "stratum_pvalue": "[V, nstrat] p-value of the change ending each stratum (1: none)",
        "manifold_p": "[V] smallest change-point p-value (NaN: not tested)",
        "fiber_p": "[V] smallest p-value of a dimension increase (NaN: not tested)",
        "manifold_q": "[V] manifold_p, Benjamini-Hochberg adjusted across tokens",
        "fiber_q": "[V] fiber_p, Benjamini-Hochberg adjusted across tokens",
        "manifold_rejected": "[V] 1 where manifold_q < fdr",
        "fiber_rejected": "[V] 1 where fiber_q < fdr",
        "n_tokens": "tokens tested", "n_degenerate": "tokens with fewer than two distinct radii in range",
        "n_manifold_rejected": "tokens rejecting the manifold null after BH",
        "n_fiber_rejected": "tokens rejecting the fiber-bundle null after BH",
    }

    @classmethod
    def skip_reason(cls, params: FiberBundleParams, view: ModelView, data: PreparedData | None) -> str | None:
        reason = source_reason(view, params.source, params.layer)
        if reason is None and _vocab(view) < params.vol_max:
            reason = (f"the vocabulary has {_vocab(view)} tokens, fewer than vol_max = {params.vol_max} "
                      "neighbours: lower vol_max")
        return reason

    @classmethod
    def cost(cls, params: FiberBundleParams, view: ModelView, shape: RunShape) -> Cost:
        v, k = _vocab(view), params.vol_max
        held = 4 * min(params.chunk_size, v) * v + 8 * v * k  # the distance block and the float64 radii
        take = min(k + MARGIN, v)
        forwards = 2 * view.n_params * v if params.source == "resid" else 0  # one one-token forward per token
        working = max(_forward_bytes(params, view, v), _candidate_bytes(params, v), _stratify_bytes(params, v))
        return Cost(state_bytes=held, transient_bytes=_points_bytes(params, view, v) + working,
                    result_bytes=result_bytes(params, v),
                    flops=float(2 * v * v * view.d_model + 3 * v * take * view.d_model + forwards))

    def finalize(self) -> dict[str, Any]:
        p = self.params
        points = token_points(self.view, p.source, p.layer)
        v = points.shape[0]
        self.workspace = torch.empty(min(p.chunk_size, v), v, dtype=torch.float32, device=points.device)
        self.radii = knn_radii(points, p.vol_max, p.chunk_size, self.workspace).cpu().numpy()
        strata = stratify(self.radii, p.vol_min, p.vol_max, npts=v, ws=p.ws, alpha=p.alpha, nstrat=p.nstrat,
                          miller=p.miller)
        tests = verdicts(strata)
        manifold_rej, manifold_q = fdr_bh(tests.manifold_p, p.fdr)
        fiber_rej, fiber_q = fdr_bh(tests.fiber_p, p.fdr)
        tensor = torch.from_numpy
        return {
            "radii": tensor(self.radii.astype(np.float32)), "n_strata": tensor(strata.n_strata),
            "dimension": tensor(strata.dimension), "start_volume": tensor(strata.start_volume),
            "end_volume": tensor(strata.end_volume), "start_radius": tensor(strata.start_radius),
            "scaling": tensor(strata.scaling), "stratum_pvalue": tensor(strata.pvalue),
            "manifold_p": tensor(tests.manifold_p), "fiber_p": tensor(tests.fiber_p),
            "manifold_q": tensor(manifold_q), "fiber_q": tensor(fiber_q),
            "manifold_rejected": tensor(manifold_rej.astype(np.float64)),
            "fiber_rejected": tensor(fiber_rej.astype(np.float64)),
            "n_tokens": v, "n_degenerate": int((strata.n_strata == 0).sum()),
            "n_manifold_rejected": int(manifold_rej.sum()), "n_fiber_rejected": int(fiber_rej.sum()),
        }
