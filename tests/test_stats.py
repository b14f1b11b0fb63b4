"""Statistics helpers: the known answers of metric-specs.md section 10, cross-checked against
pingouin and against the definitions, plus the minimum-sample floor."""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pingouin
import pytest
from scipy import stats as sps

from tensorscope_core import stats
from tensorscope_core.errors import MissingDependencyError

X = [1, 2, 3, 4, 5]
Y = [3, 4, 5, 6, 7]


# -- section 10, case 1: Benjamini-Hochberg ----------------------------------------------------
def test_bh_known_answer() -> None:
    reject, adjusted = stats.fdr_bh([0.50, 0.003, 0.32, 0.054, 0.0003], alpha=0.05)
    assert adjusted == pytest.approx([0.5, 0.0075, 0.4, 0.09, 0.0015])
    assert reject.tolist() == [False, True, False, False, True]


def test_bh_matches_pingouin_and_keeps_nans() -> None:
    p = np.random.default_rng(0).uniform(0, 0.2, 30)
    p[[3, 17]] = np.nan
    reject, adjusted = stats.fdr_bh(p, alpha=0.05)
    want_reject, want = pingouin.multicomp(p, alpha=0.05, method="fdr_bh")
    assert np.allclose(adjusted, want, equal_nan=True)
    assert reject.tolist() == want_reject.tolist()
    assert np.isnan(adjusted[[3, 17]]).all() and not reject[[3, 17]].any()


def test_adjust_fills_only_claimed_tests() -> None:
    family = [stats.Correlation(method="spearman", n=40, r=0.9, p=0.0003),
              stats.Correlation(method="spearman", n=40, r=0.1, p=0.50),
              stats.Correlation(method="spearman", n=5, r=0.99, claimed=False, reason="floor")]
    stats.adjust(family, 0.05)
    assert family[0].significant and family[0].p_adjusted == pytest.approx(0.0006)
    assert not family[1].significant and family[1].p_adjusted == pytest.approx(0.5)
    assert family[2].p_adjusted is None and not family[2].significant


# -- section 10, case 2: effect sizes ----------------------------------------------------------
def test_cohens_d_known_answer() -> None:
    assert stats.cohens_d(X, Y) == pytest.approx(-1.264911, abs=1e-6)


def test_cliffs_delta_known_answer_and_cles() -> None:
    delta = stats.cliffs_delta(X, Y)
    assert delta == pytest.approx(-0.64)
    assert (delta + 1) / 2 == pytest.approx(0.18)  # CLES(x > y) = P(x>y) + P(tie)/2
    assert float(pingouin.mwu(X, Y)["RBC"].iloc[0]) == pytest.approx(delta)  # pingouin >= 0.5.5 sign


def test_cliffs_delta_matches_its_definition_with_ties() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 6, 23), rng.integers(1, 7, 31)
    pairs = list(itertools.product(a, b))
    want = (sum(x > y for x, y in pairs) - sum(x < y for x, y in pairs)) / len(pairs)
    assert stats.cliffs_delta(a, b) == pytest.approx(want)


def test_cohens_d_without_pingouin_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pingouin", None)
    with pytest.raises(MissingDependencyError, match="pingouin") as info:
        stats.cohens_d(X, Y)
    assert "tensorscope[report]" in info.value.fix


# -- section 10, case 3: bootstrap -------------------------------------------------------------
def test_bootstrap_constant_data_gives_the_degenerate_interval() -> None:
    assert stats.bootstrap_ci([2.5] * 20, seed=0) == (2.5, 2.5)


def test_bootstrap_same_seed_same_interval() -> None:
    data = np.random.default_rng(3).normal(size=40)
    first = stats.bootstrap_ci(data, seed=7)
    assert stats.bootstrap_ci(data, seed=7) == first
    assert stats.bootstrap_ci(data, seed=8) != first
    assert first[0] < data.mean() < first[1]


def test_bootstrap_coverage_of_normal_means() -> None:
    rng = np.random.default_rng(0)
    reps = 200
    covered = 0
    for i in range(reps):
        low, high = stats.bootstrap_ci(rng.normal(size=50), seed=i, n_resamples=500)
        covered += low <= 0.0 <= high
    # nominal 95%; the percentile bootstrap runs slightly under at n=50; 3 simulation SEs ~ 0.046
    assert 0.88 <= covered / reps <= 0.99


def test_bootstrap_ratio_ci_is_unchanged() -> None:
    low, high = stats.bootstrap_ratio_ci([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0], seed=0)
    assert low <= 2.5 <= high
    assert all(np.isnan(v) for v in stats.bootstrap_ratio_ci([1.0], [1.0], seed=0))  # below two examples


# -- correlations and the floor ----------------------------------------------------------------
@pytest.mark.parametrize("method", ["spearman", "pearson"])
def test_correlation_matches_scipy_with_a_seeded_ci(method: stats.Method) -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=60)
    y = 0.6 * x + rng.normal(size=60)
    got = stats.correlation(x, y, method=method, seed=3)
    want = sps.spearmanr(x, y) if method == "spearman" else sps.pearsonr(x, y)
    assert got.claimed and got.n == 60
    assert got.r == pytest.approx(want.statistic) and got.p == pytest.approx(want.pvalue)
    assert got.ci_low is not None and got.ci_high is not None and got.ci_low < got.r < got.ci_high
    assert stats.correlation(x, y, method=method, seed=3) == got


def test_correlation_below_the_floor_is_described_not_claimed() -> None:
    got = stats.correlation([1, 2, 3, 4, 5], [2, 4, 5, 8, 9], min_n=30)
    assert not got.claimed and got.p is None and got.ci_low is None
    assert got.r == pytest.approx(1.0) and got.n == 5
    assert got.reason is not None and "n=5" in got.reason and "min_n=30" in got.reason


def test_correlation_drops_non_finite_pairs_and_refuses_constants() -> None:
    x = [1.0, 2.0, float("nan"), 4.0, 5.0, 6.0]
    y = [1.0, 3.0, 2.0, float("inf"), 5.0, 7.0]
    assert stats.correlation(x, y, min_n=3, n_resamples=0).n == 4
    constant = stats.correlation([1.0] * 40, list(range(40)), min_n=3)
    assert not constant.claimed and constant.reason is not None and "constant" in constant.reason


# -- differences and trends --------------------------------------------------------------------
def test_paired_difference_finds_a_planted_shift() -> None:
    rng = np.random.default_rng(4)
    a = rng.normal(size=40)
    b = a + 0.5 + 0.3 * rng.normal(size=40)
    got = stats.difference_test(a, b, paired=True, seed=0)
    assert got.test == "wilcoxon" and got.claimed and got.p is not None and got.p < 1e-4
    assert got.mean_difference == pytest.approx(float(np.mean(b - a)))
    assert got.ci_low is not None and got.ci_high is not None and got.ci_low < got.mean_difference < got.ci_high
    assert got.p == pytest.approx(sps.wilcoxon(b, a).pvalue)
    assert got.cohen_d == pytest.approx(pingouin.compute_effsize(b, a, paired=True, eftype="cohen"))
    assert got.cliffs_delta == pytest.approx(stats.cliffs_delta(b, a))


def test_unpaired_difference_and_the_floor() -> None:
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=35), rng.normal(size=45)
    got = stats.difference_test(a, b, paired=False, seed=0)
    assert got.test == "mannwhitneyu" and got.claimed
    assert got.p == pytest.approx(sps.mannwhitneyu(b, a).pvalue)
    small = stats.difference_test(a[:8], b[:8], paired=True)
    assert not small.claimed and small.p is None and small.reason is not None and "min_n=30" in small.reason


def test_trend_over_checkpoints() -> None:
    up = stats.trend_test([0.1, 0.3, 0.2, 0.5, 0.7, 0.9])
    want = sps.kendalltau(range(6), [0.1, 0.3, 0.2, 0.5, 0.7, 0.9])
    assert up.claimed and up.direction == "increasing" and up.tau == pytest.approx(want.statistic)
    assert up.p == pytest.approx(want.pvalue)
    short = stats.trend_test([3.0, 2.0, 1.0])
    assert not short.claimed and short.direction == "decreasing" and short.tau == pytest.approx(-1.0)
    assert short.reason is not None and "min_n=5" in short.reason
    assert not stats.trend_test([1.0] * 6).claimed


# -- correlation within groups (pseudo-replication) ---------------------------------------------
def _drifting(rng: np.random.Generator, groups: int = 6, per_group: int = 8,
              within: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x and y that both follow the group's level (a checkpoint drifting), correlated ``within`` a group."""
    level = np.repeat(np.arange(groups, dtype=float) * 3.0, per_group)
    noise_x = rng.normal(size=level.size)
    noise_y = within * noise_x + np.sqrt(1 - within**2) * rng.normal(size=level.size)
    return level + noise_x, level + noise_y, np.repeat(np.arange(groups), per_group)


@pytest.mark.parametrize("method", ["spearman", "pearson"])
def test_grouped_correlation_ignores_what_only_the_groups_share(method: stats.Method) -> None:
    x, y, groups = _drifting(np.random.default_rng(0))
    pooled = stats.correlation(x, y, method=method, min_n=10, n_resamples=0)
    within = stats.grouped_correlation(x, y, groups, method=method, min_n=10)
    assert pooled.r is not None and pooled.r > 0.85 and pooled.p is not None and pooled.p < 1e-10
    assert within.r is not None and abs(within.r) < 0.3 and within.p is not None and within.p > 0.05
    assert within.groups == 6 and within.n == 48 and "within 6 groups" in within.test


def test_grouped_correlation_is_the_centred_within_group_correlation_and_finds_a_real_one() -> None:
    x, y, groups = _drifting(np.random.default_rng(1), within=0.8)
    got = stats.grouped_correlation(x, y, groups, method="pearson", min_n=10)
    xc = x - np.array([x[groups == g].mean() for g in groups])
    yc = y - np.array([y[groups == g].mean() for g in groups])
    assert got.r == pytest.approx(float(xc @ yc / np.sqrt((xc @ xc) * (yc @ yc))), rel=1e-12)
    assert got.p == pytest.approx(1 / (1 + stats.N_RESAMPLES))  # no within-group shuffle reaches it
    z, half = np.arctanh(got.r), sps.norm.ppf(0.975) / np.sqrt(48 - 6 + 1 - 3)
    assert (got.ci_low, got.ci_high) == pytest.approx((np.tanh(z - half), np.tanh(z + half)), rel=1e-12)
    ranks = stats.grouped_correlation(x, y, groups, method="spearman", min_n=10)
    rx = np.concatenate([sps.rankdata(x[groups == g]) for g in range(6)])
    ry = np.concatenate([sps.rankdata(y[groups == g]) for g in range(6)])
    assert ranks.r == pytest.approx(stats.grouped_correlation(rx, ry, groups, method="pearson", min_n=10).r,
                                    rel=1e-12)


def test_grouped_correlation_of_one_group_is_the_plain_one() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=40), rng.normal(size=40)
    for method in ("spearman", "pearson"):
        one = stats.grouped_correlation(x, y, ["m"] * 40, method=method, min_n=10)
        assert one.r == pytest.approx(stats.correlation(x, y, method=method, min_n=10).r, rel=1e-12)


def test_grouped_permutation_test_holds_its_level_under_the_null() -> None:
    """300 seeded null data sets (drifting groups, no within-group relation): the rejection rate at
    0.05 stays within three binomial SDs of 0.05."""
    rng = np.random.default_rng(3)
    runs = 300
    rejected = sum(stats.grouped_correlation(*_drifting(rng), min_n=10, n_resamples=199, seed=i).p < 0.05
                   for i in range(runs))
    assert abs(rejected / runs - 0.05) <= 3 * np.sqrt(0.05 * 0.95 / runs), rejected


def test_grouped_correlation_floor_counts_the_within_group_pairs() -> None:
    x, y, groups = _drifting(np.random.default_rng(4), groups=6, per_group=5)
    below = stats.grouped_correlation(x, y, groups, min_n=30)
    assert not below.claimed and below.reason and "n=25" in below.reason and below.p is None


def test_grouped_correlation_without_permutations_is_the_partial_correlation_t_test() -> None:
    x, y, groups = _drifting(np.random.default_rng(6), within=0.3)
    got = stats.grouped_correlation(x, y, groups, method="pearson", min_n=10, n_resamples=0)
    dummies = np.eye(6)[groups]  # the group means, partialled out by least squares
    rx = x - dummies @ np.linalg.lstsq(dummies, x, rcond=None)[0]
    ry = y - dummies @ np.linalg.lstsq(dummies, y, rcond=None)[0]
    r = float(rx @ ry / np.sqrt((rx @ rx) * (ry @ ry)))
    df = 48 - 6 - 1
    want = 2 * sps.t.sf(abs(r) * np.sqrt(df / (1 - r * r)), df)
    assert got.r == pytest.approx(r, rel=1e-12) and got.p == pytest.approx(want, rel=1e-9)
    assert "t test at df = n - groups - 1 = 41" in got.test and got.ci_low is None
