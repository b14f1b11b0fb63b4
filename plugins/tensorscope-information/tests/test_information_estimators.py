"""The estimators behind information.mutual_information against closed forms and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from information_toys import gaussian_mi as closed_form
from sklearn.feature_selection import mutual_info_regression
from tensorscope_information.estimates import gaussian_estimate, ksg_estimate, probe_bound
from tensorscope_information.gaussian import fit_whitener, gaussian_mi, usable_dims
from tensorscope_information.ksg import ksg_mi
from tensorscope_information.labels import bucket, entropy_nats, frequent_tokens
from tensorscope_information.resampling import group_index, held_out_split

N = 40_000


def _pairs(rho: float, n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    return x, rho * x + math.sqrt(1 - rho**2) * rng.standard_normal((n, d))


@pytest.mark.parametrize(("rho", "known"), [(0.5, 0.1438), (0.75, 0.4133), (0.9, 0.8304)])
def test_gaussian_mi_bivariate_known_answers(rho, known):
    """Spec: -1/2 ln(1 - rho^2). Tolerance: 4 standard errors, SE ~ rho / sqrt(n) (delta method)."""
    x, y = _pairs(rho, N, 1, seed=1)
    mix = 3.0 * x + 1.0  # PCA whitening removes any affine scale of a side
    value = gaussian_mi(fit_whitener(mix, 8)(mix), fit_whitener(y, 8)(y))
    assert closed_form(rho) == pytest.approx(known, abs=5e-5)
    assert abs(value - known) < 4 * rho / math.sqrt(N)


def test_gaussian_mi_adds_over_independent_pairs_and_is_zero_when_independent():
    rhos = np.array([0.5, 0.75, 0.9])
    rng = np.random.default_rng(2)
    x = rng.standard_normal((N, 3))
    y = rhos * x + np.sqrt(1 - rhos**2) * rng.standard_normal((N, 3))
    rotation = np.linalg.qr(rng.standard_normal((3, 3)))[0]  # mixing within a side leaves the MI unchanged
    value = gaussian_mi(fit_whitener(x @ rotation, 3)(x @ rotation), fit_whitener(y, 3)(y))
    assert value == pytest.approx(sum(closed_form(r) for r in rhos), abs=4 * rhos.sum() / math.sqrt(N))
    z = rng.standard_normal((N, 3))
    assert gaussian_mi(fit_whitener(x, 3)(x), fit_whitener(z, 3)(z)) < 5e-4


def test_gaussian_mi_equals_canonical_correlation_sum():
    """Independent route: canonical correlations of the whitened blocks by an SVD, no shrinkage when n is huge."""
    x, y = _pairs(0.6, N, 2, seed=3)
    wx, wy = fit_whitener(x, 2)(x), fit_whitener(y, 2)(y)
    rho = np.linalg.svd(wx.T @ wy / N, compute_uv=False)
    assert gaussian_mi(wx, wy) == pytest.approx(-0.5 * np.log(1 - rho**2).sum(), rel=2e-3)


def test_n_below_r_reduces_r_or_refuses():
    assert usable_dims(n=1000, d=768, r=32, min_tokens_per_dim=5) == 32
    assert usable_dims(n=100, d=768, r=32, min_tokens_per_dim=5) == 10  # 2r x 2r covariance, 5 tokens per dim
    assert usable_dims(n=9, d=768, r=32, min_tokens_per_dim=5) == 0  # refuse
    assert usable_dims(n=10_000, d=4, r=32, min_tokens_per_dim=5) == 4


@pytest.mark.parametrize("rho", [0.5, 0.75, 0.9])
def test_ksg_against_closed_form_and_scikit_learn(rho):
    """KSG on 1-D pairs: the closed form within its sampling error, scikit-learn's KSG within jitter."""
    x, y = _pairs(rho, 3000, 1, seed=4)
    value = ksg_mi(x, y, k=3)
    ref = mutual_info_regression(x, y[:, 0], n_neighbors=3, random_state=0)[0]
    assert value == pytest.approx(ref, abs=2e-3)
    assert value == pytest.approx(closed_form(rho), abs=0.06)


def test_ksg_multivariate_pairs_add():
    x, y = _pairs(0.75, 4000, 2, seed=5)
    assert ksg_mi(x, y, k=3) == pytest.approx(2 * closed_form(0.75), abs=0.08)


def test_probe_bound_is_ln_k_when_the_label_is_the_input():
    """Spec: Y = X uniform over k values -> ln k. The probe reads a one-hot-like embedding of Y."""
    k, per_seq, n_seq = 8, 32, 40
    rng = np.random.default_rng(6)
    labels = torch.from_numpy(rng.integers(0, k, size=n_seq * per_seq))
    x = torch.from_numpy(rng.standard_normal((k, 16)).astype(np.float32))[labels]
    groups = np.repeat(np.arange(n_seq), per_seq)
    held = held_out_split(groups, n_seq, 0.25, seed=0)
    bound = probe_bound(x, labels, k, held, groups, l2=1e-4, max_iter=200, n_resamples=50, seed=0)
    counts = np.bincount(labels.numpy()[held], minlength=k)
    assert bound.entropy == pytest.approx(float(entropy_nats(counts)), abs=1e-12)
    assert bound.entropy == pytest.approx(math.log(k), abs=0.02)
    assert bound.information.value == pytest.approx(math.log(k), abs=0.05)
    assert bound.information.ci_low <= bound.information.value <= bound.information.ci_high + 1e-12


def test_probe_bound_is_zero_without_information():
    rng = np.random.default_rng(7)
    labels = torch.from_numpy(rng.integers(0, 4, size=1200))
    x = torch.from_numpy(rng.standard_normal((1200, 8)).astype(np.float32))
    groups = np.repeat(np.arange(40), 30)
    held = held_out_split(groups, 40, 0.25, seed=1)
    bound = probe_bound(x, labels, 4, held, groups, l2=1e-3, max_iter=100, n_resamples=20, seed=0)
    assert bound.information.value == 0.0 and bound.cross_entropy >= bound.entropy


def test_label_restriction_and_split_are_by_sequence():
    targets = torch.tensor([5, 5, 5, 7, 7, 9, 11])
    kept = frequent_tokens(targets, 2)
    assert kept.tolist() == [5, 7]
    assert bucket(targets, kept).tolist() == [0, 0, 0, 1, 1, 2, 2]
    groups, n = group_index(torch.tensor([3, 3, 8, 8, 8, 9]))
    held = held_out_split(groups, n, 0.34, seed=0)
    assert n == 3
    assert all(len(set(held[groups == g])) == 1 for g in range(n))  # a sequence stays whole
    assert len({g for g in range(n) if held[groups == g][0]}) == 1  # round(0.34 x 3) sequences held out


def test_cis_cover_the_estimates():
    x, y = _pairs(0.75, 2000, 1, seed=8)
    groups = np.repeat(np.arange(50), 40)
    g = gaussian_estimate(x, y, groups, 50, 100, seed=0)
    assert g.ci_low < g.value < g.ci_high and g.ci_high - g.ci_low < 0.2
    k = ksg_estimate(x, y, groups, 50, 3, 30, seed=0)
    assert k.ci_low < k.value < k.ci_high and k.ci_high - k.ci_low < 0.3
