"""geometry.singularities: the tokens whose neighbourhoods reject the manifold / fiber-bundle nulls."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    Interpretation,
    Metric,
    MetricResult,
    ModelView,
    Params,
    RunShape,
    ScalarValue,
    SeriesValue,
    TableValue,
    bootstrap_ci,
)

FIBER = "geometry.fiber_bundle"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
HOTSPOTS = 3  # rejecting tokens named in reports
BOOTSTRAP_RESAMPLES = 1000  # bootstrap_ci's default n_resamples
BOOTSTRAP_VALUES = 10_000_000  # values bootstrap_ci resamples per vectorised call (whole resamples)


class SingularitiesParams(Params):
    top: int = Field(100, ge=1, description="rows of the ranked table of rejecting tokens")


def decode(tokenizer: Any, token_id: int) -> str:
    """The token's text through the tokenizer ('' without one, or for embedding rows past its
    vocabulary, as in models whose embedding is padded to a round size)."""
    if tokenizer is None or token_id >= len(tokenizer):
        return ""
    return str(tokenizer.decode([token_id]))


def bootstrap_bytes(n: int) -> int:
    """A bootstrap CI of n values: the core resamples in batches of about ``BOOTSTRAP_VALUES`` values
    (whole resamples, at most ``BOOTSTRAP_RESAMPLES``), holding per value its int64 index, the float64
    resampled value and the statistic's float64 copy."""
    resamples = max(1, min(BOOTSTRAP_RESAMPLES, BOOTSTRAP_VALUES // max(n, 1)))
    return 3 * 8 * resamples * n


def _fraction(flags: np.ndarray, seed: int) -> ScalarValue:
    low, high = bootstrap_ci(flags, np.mean, seed=seed) if flags.size else (np.nan, np.nan)
    return ScalarValue(value=float(flags.mean()) if flags.size else np.nan, ci_low=low, ci_high=high,
                       n=int(flags.size))


class Singularities(Metric):
    """The embedding singularities found by ``geometry.fiber_bundle`` (read by name, not recomputed):
    tokens whose neighbourhood rejects the manifold null after Benjamini-Hochberg across tokens,
    ranked by adjusted p-value (then raw p-value), with their text decoded through the model's
    tokenizer, whether the fiber-bundle null is rejected too (a dimension increase), and their
    stratum dimensions and change-point volumes, smallest radius first.

    Per-model summaries, usable as scalars for cross-model correlation (for example against a
    benchmark score): the fraction of tested tokens rejecting each null (bootstrap 95% CI over
    tokens), and the distribution of local dimensions (first stratum of every tested token).
    """

    name = "geometry.singularities"
    supports_dispatch = True  # reads geometry.fiber_bundle's result only
    version = "1"
    summary = "tokens whose embedding neighbourhoods reject the manifold / fiber-bundle hypotheses"
    Params = SingularitiesParams
    requires_metrics = (FIBER,)
    derived_from = (FIBER,)
    fields = {
        "tokens": "table of rejecting tokens, most significant first: rank, token_id, token, manifold_q, "
                  "fiber_q, fiber_rejected, n_strata, dimensions, change_volumes",
        "fraction_manifold_rejected": "fraction of tested tokens rejecting the manifold null (BH), 95% CI",
        "fraction_fiber_rejected": "fraction of tested tokens rejecting the fiber-bundle null (BH), 95% CI",
        "median_dimension": "median local dimension (first stratum) over tested tokens, 95% CI",
        "dimension_quantiles": "local dimension (first stratum) at quantiles 0.05, 0.25, 0.5, 0.75, 0.95",
        "singular_median_dimension": "median local dimension (first stratum) of the rejecting tokens",
    }

    @classmethod
    def cost(cls, params: SingularitiesParams, view: ModelView, shape: RunShape) -> Cost:
        v = int(view.embed.weight.shape[0])
        # the bootstrap resamples up to V tokens (fiber_bundle's result arrays, which the run keeps, are its)
        return Cost(state_bytes=0, transient_bytes=bootstrap_bytes(v), flops=float(v * 20))

    @classmethod
    def interpret(cls, result: MetricResult) -> list[Interpretation]:
        """The most significant rejecting tokens, as hotspots."""
        table = result.values.get("tokens")
        if not isinstance(table, TableValue):
            return []
        col = {name: i for i, name in enumerate(table.columns)}
        return [Interpretation(level="hotspot", where=f"token {row[col['token_id']]} {row[col['token']]!r}",
                               text=f"neighbourhood rejects the manifold null (q = {row[col['manifold_q']]:.2g})"
                                    + (", with a dimension increase (fiber bundle rejected)"
                                       if row[col["fiber_rejected"]] else "")
                                    + f"; stratum dimensions {row[col['dimensions']]}")
                for row in table.rows[:HOTSPOTS]]

    def finalize(self) -> dict[str, Any]:
        fiber = self.deps[FIBER]

        def read(field: str) -> np.ndarray:
            return self.tensor_of(fiber, field).numpy()

        tested = read("n_strata") > 0
        manifold_q, fiber_q, manifold_p = read("manifold_q"), read("fiber_q"), read("manifold_p")
        rejected, fiber_rejected = read("manifold_rejected") > 0, read("fiber_rejected") > 0
        dims, starts, n_strata = read("dimension"), read("start_volume"), read("n_strata")
        ids = np.flatnonzero(rejected)
        ids = ids[np.lexsort((manifold_p[ids], manifold_q[ids]))][: self.params.top]
        rows = [[rank + 1, int(i), decode(self.view.tokenizer, int(i)), float(manifold_q[i]), float(fiber_q[i]),
                 bool(fiber_rejected[i]), int(n_strata[i]),
                 " / ".join(f"{d:.3f}" for d in dims[i, : n_strata[i]]),
                 " / ".join(str(int(v)) for v in starts[i, 1: n_strata[i]])] for rank, i in enumerate(ids)]
        first = dims[tested, 0]
        first = first[np.isfinite(first)]
        singular = dims[rejected, 0]
        singular = singular[np.isfinite(singular)]
        seed = self.shape.seed
        low, high = bootstrap_ci(first, np.median, seed=seed) if first.size else (np.nan, np.nan)
        return {
            "tokens": TableValue(columns=["rank", "token_id", "token", "manifold_q", "fiber_q", "fiber_rejected",
                                          "n_strata", "dimensions", "change_volumes"], rows=rows),
            "fraction_manifold_rejected": _fraction(rejected[tested].astype(np.float64), seed),
            "fraction_fiber_rejected": _fraction(fiber_rejected[tested].astype(np.float64), seed),
            "median_dimension": ScalarValue(value=float(np.median(first)) if first.size else np.nan,
                                            ci_low=low, ci_high=high, n=int(first.size)),
            "dimension_quantiles": SeriesValue(values=np.quantile(first, QUANTILES).tolist() if first.size
                                               else [np.nan] * len(QUANTILES), index_name="quantile"),
            "singular_median_dimension": ScalarValue(value=float(np.median(singular)) if singular.size else np.nan,
                                                     n=int(singular.size)),
        }
