"""Statistics helpers shared by the core and plugins, on scipy and pingouin.

Nothing here re-implements what those libraries provide: correlations and their
p-values, Benjamini-Hochberg, bootstrap intervals, rank tests and Kendall's tau come
from scipy; Cohen's d from pingouin (optional extra ``report``, imported on use).
Every test applies a minimum-sample floor: below it nothing is claimed, and the
result says why instead of carrying a p-value that invites a reading.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict
from scipy import stats

N_RESAMPLES = 1000
Method = Literal["spearman", "pearson"]
ArrayLike = Sequence[float] | npt.ArrayLike


class InsufficientSampleWarning(UserWarning):
    """Some comparison had fewer observations than its floor and was not claimed."""


class _Stat(BaseModel):
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="null")

    n: int
    p: float | None = None
    p_adjusted: float | None = None
    significant: bool = False
    claimed: bool = True
    reason: str | None = None


class Correlation(_Stat):
    """A correlation with its p-value, bootstrap CI and n; ``r`` is its own effect size."""

    method: Method
    r: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    #: how r, p and the CI were computed: over all pairs as independent, or within groups (the
    #: observations of one model) with the group means removed and a permutation within groups
    test: str = "pooled: pairs as independent observations; bootstrap CI"
    #: the number of groups for a within-group test (None: pooled)
    groups: int | None = None


class Difference(_Stat):
    """Per-example comparison of two models: ``mean_difference`` is mean(b) - mean(a)."""

    test: Literal["wilcoxon", "mannwhitneyu"]
    paired: bool
    mean_difference: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    cohen_d: float | None = None
    cliffs_delta: float | None = None


class Trend(_Stat):
    """Kendall's tau of values against checkpoint order (the Mann-Kendall trend test)."""

    test: Literal["kendall"] = "kendall"
    tau: float | None = None
    direction: Literal["increasing", "decreasing", "none"] = "none"


def _floats(values: ArrayLike) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).ravel()


def _finite_pairs(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    a, b = _floats(x), _floats(y)
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal lengths, got {a.size} and {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]


def floor_reason(n: int, min_n: int, what: str = "observations") -> str | None:
    """Why a statistic is not claimed at this ``n`` (None when ``n`` reaches the floor)."""
    if n < min_n:
        return f"n={n} {what} < min_n={min_n}: not claimed"
    return None


def _bootstrap(*args: Any, **kwargs: Any) -> Any:
    """scipy.stats.bootstrap without its DegenerateDataWarning: a degenerate resample distribution
    gives a NaN interval, which the callers report as no CI (the warning only reached the user's terminal)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        return stats.bootstrap(*args, **kwargs)


def _rank_corr(method: Method) -> Callable[..., Any]:
    """The statistic scipy.stats.bootstrap calls on many resamples at once (vectorized)."""

    def pearson(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return np.asarray(stats.pearsonr(a, b, axis=axis).statistic)

    def spearman(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
        # Spearman's rho is Pearson's r of the (average) ranks, as scipy.stats.spearmanr computes it
        return pearson(stats.rankdata(a, axis=axis), stats.rankdata(b, axis=axis), axis=axis)

    return spearman if method == "spearman" else pearson


def correlation(x: ArrayLike, y: ArrayLike, *, method: Method = "spearman", min_n: int = 30, seed: int = 0,
                level: float = 0.95, n_resamples: int = N_RESAMPLES) -> Correlation:
    """Spearman or Pearson correlation over the pairs where both values are finite.

    Below ``min_n`` pairs only ``r`` is reported (descriptive) with ``claimed=False``;
    a constant variable has no correlation. The CI is a percentile bootstrap over
    pairs (seeded); ``n_resamples=0`` leaves it out.
    """
    a, b = _finite_pairs(x, y)
    n = int(a.size)
    if n < 3:
        return Correlation(method=method, n=n, claimed=False, reason=floor_reason(n, max(3, min_n), "pairs"))
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return Correlation(method=method, n=n, claimed=False, reason="a variable is constant: no correlation")
    res = stats.spearmanr(a, b) if method == "spearman" else stats.pearsonr(a, b)
    r = float(res.statistic)
    reason = floor_reason(n, min_n, "pairs")
    if reason:
        return Correlation(method=method, n=n, r=r, claimed=False, reason=reason)
    low = high = None
    if n_resamples > 0:
        ci = _bootstrap((a, b), _rank_corr(method), paired=True, vectorized=True, confidence_level=level,
                             n_resamples=n_resamples, batch=_batch(n, n_resamples), method="percentile",
                             random_state=np.random.default_rng(seed))
        low, high = float(ci.confidence_interval.low), float(ci.confidence_interval.high)
    return Correlation(method=method, n=n, r=r, p=float(res.pvalue), ci_low=_finite(low), ci_high=_finite(high))


WITHIN_TEST = ("within {g} groups: each group's {what} centred on its mean, permutation of y within groups "
               "({perms} permutations), Fisher-z CI at n - groups + 1")


def _within_group(values: np.ndarray, labels: np.ndarray, rank: bool) -> np.ndarray:
    """``values`` ranked within each group (for Spearman) and centred on each group's mean."""
    out = np.empty_like(values)
    for g in np.unique(labels):
        sel = labels == g
        v = stats.rankdata(values[sel]) if rank else values[sel]
        out[sel] = v - v.mean()
    return out


def grouped_correlation(x: ArrayLike, y: ArrayLike, groups: Sequence[Any], *, method: Method = "spearman",
                        min_n: int = 30, seed: int = 0, level: float = 0.95,
                        n_resamples: int = N_RESAMPLES) -> Correlation:
    """The correlation of x and y within groups (e.g. the layers or heads of each checkpoint): values
    ranked (Spearman) and centred within their group, so that differences between groups (checkpoints
    drifting together) do not count as evidence, and tested by permuting y within groups.

    Pooling the layers of six checkpoints as 6 x L independent pairs is pseudo-replication: two
    metrics that both rise during training correlate through the checkpoint alone. ``r`` is the pooled
    within-group correlation; ``p`` = (1 + #{|r_perm| >= |r|}) / (1 + n_resamples) (``n_resamples``
    0: the t test at df = n - groups - 1, no CI); the CI is Fisher's z at the within-group degrees of
    freedom, n - groups + 1, which is also the n the floor ``min_n`` is compared with.
    """
    a, b = _floats(x), _floats(y)
    labels = np.asarray(list(groups))
    if not (a.shape == b.shape == labels.shape):
        raise ValueError(f"x, y and groups need equal lengths, got {a.size}, {b.size} and {labels.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b, labels = a[keep], b[keep], labels[keep]
    sizes = {g: int((labels == g).sum()) for g in np.unique(labels)}
    kept = np.isin(labels, [g for g, k in sizes.items() if k >= 2])  # a group of one carries no within-group pair
    a, b, labels = a[kept], b[kept], labels[kept]
    g = len(np.unique(labels))
    n = int(a.size)
    test = WITHIN_TEST.format(g=g, what="ranks" if method == "spearman" else "values", perms=n_resamples)
    base = {"method": method, "n": n, "groups": g, "test": test}
    if g < 1 or n - g < 2:
        return Correlation(**base, claimed=False, reason=f"n={n} in {g} groups leaves no within-group variation")
    ac, bc = _within_group(a, labels, method == "spearman"), _within_group(b, labels, method == "spearman")
    norm = float(np.sqrt((ac @ ac) * (bc @ bc)))
    if norm == 0:
        return Correlation(**base, claimed=False, reason="a variable is constant within every group: no correlation")
    r = float(ac @ bc) / norm
    n_eff = n - g + 1
    reason = floor_reason(n_eff, min_n, f"pairs (within-group df + 2, {n} pairs in {g} groups)")
    if reason:
        return Correlation(**base, r=r, claimed=False, reason=reason)
    if n_resamples <= 0:  # no permutations: the t test of a correlation with group dummies partialled out
        df = n - g - 1
        t = r * np.sqrt(df / max(1.0 - r * r, 1e-300))
        base["test"] = test.split(", permutation")[0] + f", t test at df = n - groups - 1 = {df}"
        return Correlation(**base, r=r, p=float(2 * stats.t.sf(abs(t), df)))
    rng = np.random.default_rng(seed)
    perm = np.tile(np.arange(n), (n_resamples, 1))
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        perm[:, idx] = idx[np.argsort(rng.random((n_resamples, idx.size)), axis=1)]
    r_perm = (bc[perm] @ ac) / norm  # group means stay 0 and sums of squares fixed under a within-group shuffle
    p = float((1 + np.sum(np.abs(r_perm) >= abs(r) - 1e-12)) / (1 + n_resamples))
    low = high = None
    if n_eff > 3 and abs(r) < 1:
        half = stats.norm.ppf(0.5 + level / 2) / np.sqrt(n_eff - 3)
        low, high = float(np.tanh(np.arctanh(r) - half)), float(np.tanh(np.arctanh(r) + half))
    return Correlation(**base, r=r, p=p, ci_low=low, ci_high=high)


def _batch(n: int, n_resamples: int) -> int:
    """Resamples per vectorized bootstrap call: about 10 million values at once, whatever n."""
    return max(1, min(n_resamples, 10_000_000 // max(n, 1)))


def _finite(v: float | None) -> float | None:
    return v if v is not None and np.isfinite(v) else None


def fdr_bh(pvalues: ArrayLike, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Benjamini-Hochberg adjusted p-values and rejections (adjusted p < alpha).

    NaN p-values (tests not run) stay NaN, are never rejected and do not count
    towards the number of tests.
    """
    p = _floats(pvalues)
    adjusted = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        adjusted[ok] = stats.false_discovery_control(p[ok], method="bh")
    reject = np.zeros(p.shape, dtype=bool)
    reject[ok] = adjusted[ok] < alpha
    return reject, adjusted


def adjust(family: Sequence[_Stat], alpha: float = 0.05) -> None:
    """Fill ``p_adjusted`` and ``significant`` of every claimed test in ``family`` (one BH family)."""
    tested = [s for s in family if s.claimed and s.p is not None]
    if not tested:
        return
    reject, adjusted = fdr_bh([float(s.p) for s in tested if s.p is not None], alpha)
    for s, rej, adj in zip(tested, reject, adjusted, strict=True):
        s.p_adjusted = float(adj)
        s.significant = bool(rej)


def _pingouin() -> Any:
    try:
        import pingouin
    except ImportError as exc:
        from .errors import MissingDependencyError

        raise MissingDependencyError("pingouin", "Cohen's d") from exc
    return pingouin


def cohens_d(x: ArrayLike, y: ArrayLike, *, paired: bool = False) -> float:
    """Cohen's d of x against y (pingouin; pooled SD, paired: d_avg)."""
    pingouin = _pingouin()
    with np.errstate(divide="ignore", invalid="ignore"):  # zero spread: d is infinite or undefined
        value = pingouin.compute_effsize(_floats(x), _floats(y), paired=paired, eftype="cohen")
    return float(value)


def cliffs_delta(x: ArrayLike, y: ArrayLike) -> float:
    """Cliff's delta, (#{x>y} - #{x<y}) / (n_x n_y), from the Mann-Whitney U of x.

    pingouin has no dedicated function; scipy's U counts x>y pairs plus half the ties,
    so delta = 2U/(n_x n_y) - 1 (this also avoids pingouin's sign change in 0.5.5).
    """
    a, b = _floats(x), _floats(y)
    u = stats.mannwhitneyu(a, b, alternative="two-sided").statistic
    return float(2.0 * u / (a.size * b.size) - 1.0)


def bootstrap_ci(samples: ArrayLike, statistic: Callable[..., Any] = np.mean, *, seed: int, level: float = 0.95,
                 n_resamples: int = N_RESAMPLES) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic`` (vectorized over ``axis``) resampling examples.

    Constant data give the degenerate interval at the constant; fewer than two
    values give (nan, nan).
    """
    x = _floats(samples)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return float("nan"), float("nan")
    if np.ptp(x) == 0:
        value = float(statistic(x))
        return value, value
    res = _bootstrap((x,), statistic, vectorized=True, confidence_level=level, n_resamples=n_resamples,
                          batch=_batch(x.size, n_resamples), method="percentile",
                          random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _mean_difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.asarray(b.mean(axis=axis) - a.mean(axis=axis))


def difference_test(a: ArrayLike, b: ArrayLike, *, paired: bool, min_n: int = 30, seed: int = 0,
                    level: float = 0.95, n_resamples: int = N_RESAMPLES) -> Difference:
    """Whether per-example values of model b differ from those of model a.

    Paired (same examples in the same order, as in one shared run): Wilcoxon
    signed-rank test and a bootstrap CI of the mean paired difference. Otherwise:
    Mann-Whitney U and a two-sample bootstrap CI. Effect sizes: Cohen's d
    (pingouin) and Cliff's delta, both of b against a.
    """
    test: Literal["wilcoxon", "mannwhitneyu"] = "wilcoxon" if paired else "mannwhitneyu"
    if paired:
        x, y = _finite_pairs(a, b)
    else:
        x, y = _floats(a), _floats(b)
        x, y = x[np.isfinite(x)], y[np.isfinite(y)]
    n = int(min(x.size, y.size))
    base = {"test": test, "paired": paired, "n": n}
    reason = floor_reason(n, min_n, "examples")
    if reason:
        return Difference(**base, claimed=False, reason=reason,
                          mean_difference=float(y.mean() - x.mean()) if n else None)
    diff = float(y.mean() - x.mean())
    if (paired and np.all(x == y)) or np.ptp(np.concatenate([x, y])) == 0:
        return Difference(**base, mean_difference=diff, ci_low=diff, ci_high=diff, p=1.0, cohen_d=0.0,
                          cliffs_delta=0.0, reason="identical values")
    if paired:
        p = float(stats.wilcoxon(y, x, zero_method="wilcox").pvalue)
        low, high = bootstrap_ci(y - x, seed=seed, level=level, n_resamples=n_resamples)
    else:
        p = float(stats.mannwhitneyu(y, x, alternative="two-sided").pvalue)
        ci = _bootstrap((x, y), _mean_difference, vectorized=True, confidence_level=level,
                             n_resamples=n_resamples, batch=_batch(x.size + y.size, n_resamples), method="percentile",
                             random_state=np.random.default_rng(seed))
        low, high = float(ci.confidence_interval.low), float(ci.confidence_interval.high)
    return Difference(**base, mean_difference=diff, ci_low=_finite(low), ci_high=_finite(high), p=p,
                      cohen_d=_finite(cohens_d(y, x, paired=paired)), cliffs_delta=cliffs_delta(y, x))


def trend_test(values: ArrayLike, positions: ArrayLike | None = None, *, min_n: int = 5) -> Trend:
    """Monotone trend of ``values`` over ordered checkpoints (Kendall's tau against order).

    Below ``min_n`` checkpoints no trend is claimed: with 4 points even a perfectly
    monotone series has an exact two-sided p of 0.083.
    """
    y = _floats(values)
    x = np.arange(y.size, dtype=np.float64) if positions is None else _floats(positions)
    keep = np.isfinite(y) & np.isfinite(x)
    x, y = x[keep], y[keep]
    n = int(y.size)
    if n < 2 or np.ptp(y) == 0:
        return Trend(n=n, claimed=False, reason="fewer than two finite values" if n < 2 else "constant values")
    res = stats.kendalltau(x, y)
    tau = float(res.statistic)
    reason = floor_reason(n, min_n, "checkpoints")
    direction: Literal["increasing", "decreasing", "none"] = "increasing" if tau > 0 else (
        "decreasing" if tau < 0 else "none")
    if reason:
        return Trend(n=n, tau=tau, direction=direction, claimed=False, reason=reason)
    return Trend(n=n, tau=tau, p=float(res.pvalue), direction=direction)


def bootstrap_ratio_ci(numerators: Sequence[float] | npt.ArrayLike, denominators: Sequence[float] | npt.ArrayLike,
                       *, seed: int,
                       level: float = 0.95, n_resamples: int = N_RESAMPLES) -> tuple[float, float]:
    """Percentile bootstrap CI of sum(num)/sum(den), resampling examples (pairs) with a seed.

    Used for token-weighted means over sequences (e.g. loss per token): the example,
    not the token, is the independent unit. Returns (nan, nan) below two examples.
    """
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if len(num) < 2:
        return float("nan"), float("nan")

    def ratio(n: np.ndarray, d: np.ndarray, axis: int = -1) -> np.ndarray:
        return n.sum(axis=axis) / d.sum(axis=axis)

    res = _bootstrap((num, den), ratio, paired=True, vectorized=True, confidence_level=level,
                          n_resamples=n_resamples, method="percentile", random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)
