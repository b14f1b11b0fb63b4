"""Volume-growth curvature: exact on closed-form ball volumes of spheres of known radius and of flat
space, exactly scale covariant, and right on sampled spheres and flat data; geometry.curvature end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.special import digamma
from tensorscope_geometry.neighbours import knn_radii
from tensorscope_geometry.volume_curvature import curvature_fit, pooled_curvature

from tensorscope_core import analyze

K = np.arange(10, 300, dtype=np.float64)


def fit(radii: np.ndarray) -> tuple[float, float]:
    n, kappa = curvature_fit(radii[None, :], K, np.ones((1, radii.size), dtype=bool))
    return float(n[0]), float(kappa[0])


def volumes(total: float, fraction: float) -> np.ndarray:
    """Noise-free ball volumes at the k-th neighbour: exp(psi(k)), scaled so the last is ``fraction`` of
    ``total`` (radii are read off the exact volume function below)."""
    w = np.exp(digamma(K))
    return w / w[-1] * fraction * total


@pytest.mark.parametrize("n", [1, 2, 3])
def test_flat_power_law_has_zero_curvature(n):
    got_n, kappa = fit(volumes(1.0, 1.0) ** (1 / n) * 7.0)
    assert got_n == pytest.approx(n, rel=1e-12)
    assert abs(kappa) < 1e-9


@pytest.mark.parametrize("radius", [1.0, 3.0])
def test_two_sphere_geodesic_balls_give_the_scalar_curvature(radius):
    """Geodesic cap area 2 pi R^2 (1 - cos(rho / R)): S = 2 / R^2 (to O(r^2): 1% of the sphere)."""
    v = volumes(4 * np.pi * radius ** 2, 0.01)
    rho = radius * np.arccos(1 - v / (2 * np.pi * radius ** 2))
    n, kappa = fit(rho)
    assert n == pytest.approx(2.0, abs=1e-5)
    assert kappa == pytest.approx(2 / radius ** 2, rel=2e-3)
    # Archimedes: in chordal (Euclidean) distance c = 2 R sin(rho / 2R) the cap area is exactly pi c^2
    n, kappa = fit(2 * radius * np.sin(rho / (2 * radius)))
    assert n == pytest.approx(2.0, rel=1e-12) and abs(kappa) * radius ** 2 < 1e-9


@pytest.mark.parametrize("radius", [1.0, 3.0])
def test_three_sphere_geodesic_and_chordal_balls(radius):
    """Geodesic ball volume pi R^3 (2t - sin 2t), t = rho / R: S = 6 / R^2; with chordal distances the
    Karp-Pinsky coefficient 3 n (n - 2) / (4 R^2) = 9 / (4 R^2), approached as the balls shrink."""
    def angles(fraction: float) -> np.ndarray:
        v = volumes(2 * np.pi ** 2 * radius ** 3, fraction)
        return np.array([brentq(lambda t, x=x: np.pi * radius ** 3 * (2 * t - np.sin(2 * t)) - x, 1e-12, np.pi)
                         for x in v])

    t = angles(0.01)
    assert fit(radius * t)[1] == pytest.approx(6 / radius ** 2, rel=3e-3)
    errors = [abs(fit(2 * radius * np.sin(angles(f) / 2))[1] * radius ** 2 - 9 / 4) for f in (0.05, 0.01, 0.001)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.01 * 9 / 4


def test_exact_scale_covariance():
    radii = np.sort(np.random.default_rng(0).uniform(1, 2, size=(5, K.size)), axis=1)
    mask = np.ones_like(radii, dtype=bool)
    n1, k1 = curvature_fit(radii, K, mask)
    n2, k2 = curvature_fit(radii * 3.7, K, mask)
    np.testing.assert_allclose(n2, n1, rtol=1e-9)
    np.testing.assert_allclose(k2, k1 / 3.7 ** 2, rtol=1e-7)


def test_fit_equals_an_independent_least_squares():
    rng = np.random.default_rng(1)
    radii = np.sort(rng.uniform(0.5, 2, size=(4, K.size)), axis=1)
    mask = np.ones_like(radii, dtype=bool)
    mask[1, :30] = False  # a stratum that starts later
    n, kappa = curvature_fit(radii, K, mask)
    for i in range(4):
        r = radii[i, mask[i]]
        a = np.column_stack([np.ones_like(r), np.log(r), r ** 2])
        c, b = np.linalg.lstsq(a, digamma(K[mask[i]]), rcond=None)[0][1:]
        assert n[i] == pytest.approx(c, rel=1e-8)
        assert kappa[i] == pytest.approx(-6 * (c + 2) * b, rel=1e-6)


def sphere(n_points: int, dim: int, radius: float, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n_points, dim + 1))
    return radius * x / np.linalg.norm(x, axis=1, keepdims=True)


def test_sampled_three_sphere_of_known_radius():
    """8000 uniform points on the 3-sphere of radius 2, vol 10-400: pooled kappa within 40% of
    9/(4 R^2). Measured at R = 1 over seeds 0-5: kappa R^2 = 2.02 +- 0.33 (sd) against 2.25."""
    radius = 2.0
    radii = knn_radii(torch.from_numpy(sphere(8000, 3, radius, 0)), 400).numpy()
    n, kappa = pooled_curvature(radii[:, 10:], np.arange(10, 400))
    assert n == pytest.approx(3.0, abs=0.05)
    assert kappa * radius ** 2 == pytest.approx(9 / 4, rel=0.4)


def test_sampled_flat_cube_interior():
    """10000 uniform points in the unit cube, tokens at least 0.22 from its faces (beyond the radius
    of the 300th neighbour): kappa r^2 near 0 (seeds 0-5: 0.29 +- 0.40), where S^3 gives about 1.9."""
    x = np.random.default_rng(0).uniform(size=(10000, 3))
    inner = np.all(np.abs(x - 0.5) < 0.28, axis=1)
    x = np.concatenate([x[inner], x[~inner]])  # the interior tokens first: only their rows are searched
    radii = knn_radii(torch.from_numpy(x), 300, rows=range(int(inner.sum()))).numpy()
    n, kappa = pooled_curvature(radii[:, 10:], np.arange(10, 300))
    scale = np.exp(np.log(radii[:, -1]).mean()) ** 2
    assert n == pytest.approx(3.0, abs=0.05)
    assert abs(kappa * scale) < 1.2


def test_curvature_metric_reads_the_fiber_radii(models):
    res = analyze(models["gpt2"], metrics=["geometry.curvature"])
    curv, fiber = res.get("geometry.curvature"), res.get("geometry.fiber_bundle")
    assert curv.ok and fiber.ok
    radii = res.tensor("geometry.fiber_bundle", "radii").double().numpy()
    start = res.tensor("geometry.fiber_bundle", "start_volume").numpy()[:, 0].astype(int)
    end = res.tensor("geometry.fiber_bundle", "end_volume").numpy()[:, 0].astype(int)
    got = res.tensor("geometry.curvature", "curvature").numpy()
    for i in range(0, radii.shape[0], 17):
        k = np.arange(start[i], end[i])
        r = radii[i, k]
        c, b = np.linalg.lstsq(np.column_stack([np.ones_like(r), np.log(r), r ** 2]), digamma(k), rcond=None)[0][1:]
        assert got[i] == pytest.approx(-6 * (c + 2) * b, rel=1e-6)
    finite = got[np.isfinite(got)]
    assert curv.value("median_curvature") == pytest.approx(float(np.median(finite)))
