"""The stratification test (metric-specs.md section 2) on its verification cases and against a
per-token transcription of the authors' code."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import scipy.spatial
from geometry_fiber_reference import dense_sorted_distances, estimate_stratifications
from tensorscope_geometry import strata as strata_module
from tensorscope_geometry.fiber_bundle import FiberBundleParams
from tensorscope_geometry.strata import check_window, stratify, verdicts


def synthetic_radii(d1: float, d2: float, knee: int = 150) -> np.ndarray:
    """r = [0, r_1..r_400]: log r_k = log k / d1 below the knee, slope 1/d2 after it, plus noise, sorted."""
    k = np.arange(1, 401, dtype=np.float64)
    log_r = np.where(k < knee, np.log(k) / d1, np.log(knee) / d1 + (np.log(k) - np.log(knee)) / d2)
    log_r = log_r + 5e-4 * np.random.default_rng(0).normal(size=400)
    return np.concatenate([[0.0], np.sort(np.exp(log_r))])[None, :]


def run(radii: np.ndarray, vol_min: int, vol_max: int, **kw):
    strata = stratify(radii, vol_min, vol_max, npts=radii.shape[1], **kw)
    return strata, verdicts(strata)


def test_slope_increase_rejects_the_fiber_bundle():
    strata, tests = run(synthetic_radii(1, 2), 10, 400, ws=10, alpha=1e-3, nstrat=3)
    assert strata.n_strata[0] == 3
    assert strata.start_volume[0].tolist() == [10, 139, 159]
    np.testing.assert_allclose(strata.dimension[0], [1.000, 1.204, 2.000], atol=5e-4)
    assert tests.manifold_p[0] < 1e-3 / 3 and tests.fiber_p[0] < 1e-3 / 3


def test_slope_decrease_rejects_the_manifold_only():
    strata, tests = run(synthetic_radii(2, 1), 10, 400, ws=10, alpha=1e-3, nstrat=3)
    assert strata.n_strata[0] == 3
    np.testing.assert_allclose(strata.dimension[0], [2.000, 1.59, 1.000], atol=5e-3)
    assert tests.manifold_p[0] < 1e-3 / 3
    assert tests.fiber_p[0] == 1.0  # every change is a decrease: consistent with a fiber bundle


def test_no_change_is_one_stratum_with_p_one():
    strata, tests = run(synthetic_radii(2, 2), 10, 400, ws=10, alpha=1e-3, nstrat=3)
    assert strata.n_strata[0] == 1
    assert strata.dimension[0, 0] == pytest.approx(2.000, abs=5e-4)
    assert strata.pvalue[0, 0] == 1.0 and tests.manifold_p[0] == 1.0 and tests.fiber_p[0] == 1.0


def test_one_dimensional_lattice():
    """{-2000..2000}, centre 0, vol 10-1500: one stratum, dimension 1.003, p = 1.0 (tied radii +-x)."""
    radii = np.sort(np.abs(np.arange(-2000, 2001, dtype=np.float64)))[None, :]
    strata, tests = run(radii, 10, 1500)
    assert strata.n_strata[0] == 1
    assert strata.dimension[0, 0] == pytest.approx(1.003, abs=5e-4)
    assert tests.manifold_p[0] == 1.0


def test_sphere_is_two_dimensional_and_matches_the_reference_loop():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 3))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    radii = dense_sorted_distances(x)
    strata, _ = run(radii, 10, 100, nstrat=2)
    assert 1.8 < np.median(strata.dimension[:, 0]) < 2.2
    for i in range(0, 1000, 50):
        assert_matches_reference(strata, i, estimate_stratifications(radii[i], 10, 100, 1000, nstrat=2))


def test_uniform_square_gives_a_spurious_boundary():
    """Pitfall of section 2: pointwise slopes are heavy-tailed on random clouds. 4000 uniform points
    (default_rng(1)), vol 10-300, default ws/alpha/nstrat: the point nearest the centre gets a
    boundary with p ~ 2.8e-5 although the square has none."""
    x = np.random.default_rng(1).uniform(size=(4000, 2))
    centre = int(np.argmin(np.linalg.norm(x - 0.5, axis=1)))
    radii = np.sort(scipy.spatial.distance_matrix(x[centre:centre + 1], x), axis=1)
    strata, tests = run(radii, 10, 300)
    assert strata.n_strata[0] > 1
    assert tests.manifold_p[0] == pytest.approx(2.8e-5, rel=0.02)


def test_noise_free_power_law_has_zero_variance_windows_and_no_change():
    """Pitfall of section 2: constant pointwise slopes give NaN Welch p-values, so nothing is detected."""
    radii = np.concatenate([[0.0], np.arange(1, 201, dtype=np.float64) ** 0.5])[None, :]
    strata, tests = run(radii, 10, 200)
    assert strata.n_strata[0] == 1 and strata.dimension[0, 0] == pytest.approx(2.0, abs=1e-12)
    assert tests.manifold_p[0] == 1.0


def assert_matches_reference(strata, i, ref):
    n = len(ref["dimension"])
    assert strata.n_strata[i] == n, (i, ref)
    np.testing.assert_array_equal(strata.start_volume[i, :n], ref["volume"])
    np.testing.assert_allclose(strata.start_radius[i, :n], ref["radius"], rtol=1e-12)
    np.testing.assert_allclose(strata.dimension[i, :n], ref["dimension"], rtol=1e-9)
    np.testing.assert_allclose(strata.scaling[i, :n], ref["scaling"], rtol=1e-9)
    np.testing.assert_allclose(strata.pvalue[i, :n], ref["pvalue"], rtol=1e-9)
    assert np.isnan(strata.dimension[i, n:]).all()


@pytest.mark.parametrize("cloud", ["uniform_square", "integer_grid", "duplicates"])
def test_vectorised_scan_equals_the_reference_loop(cloud):
    """Random clouds (heavy-tailed slopes, many changes), tied radii on a grid, duplicated points."""
    rng = np.random.default_rng(3)
    if cloud == "uniform_square":
        x = rng.uniform(size=(600, 2))
    elif cloud == "integer_grid":
        x = rng.integers(0, 12, size=(600, 3)).astype(np.float64)
    else:
        x = rng.normal(size=(600, 4))
        x[100:115] = x[99]  # 16 copies: zero radii skipped at the start of the range
    radii = dense_sorted_distances(x)
    strata, _ = run(radii, 10, 80, ws=8, alpha=1e-2, nstrat=3)
    rows = list(range(0, 600, 50)) + (list(range(97, 118)) if cloud == "duplicates" else [])
    for i in rows:
        assert_matches_reference(strata, i, estimate_stratifications(radii[i], 10, 80, 600, nstrat=3, ws=8,
                                                                     alpha=1e-2))
    assert (strata.n_strata[rows] > 1).any()  # the comparison covers changes, not only single strata


def test_row_chunks_do_not_change_the_result(monkeypatch):
    rng = np.random.default_rng(5)
    radii = dense_sorted_distances(rng.uniform(size=(300, 2)))
    whole = stratify(radii, 10, 80, npts=300)
    monkeypatch.setattr(strata_module, "ROW_CHUNK", 7)
    chunked = stratify(radii, 10, 80, npts=300)
    for name in ("n_strata", "start_volume", "dimension", "scaling", "pvalue"):
        np.testing.assert_array_equal(getattr(chunked, name), getattr(whole, name))
    assert (whole.n_strata > 1).any()


def test_all_duplicate_neighbourhood_is_not_tested():
    radii = np.zeros((1, 60))
    strata, tests = run(radii, 10, 60)
    assert strata.n_strata[0] == 0 and np.isnan(tests.manifold_p[0]) and np.isnan(tests.fiber_p[0])


def test_window_that_can_never_detect_is_refused():
    with pytest.raises(ValueError, match="raise vol_max above 50"):
        check_window(10, 50, 10)
    with pytest.raises(pydantic.ValidationError, match="can never detect a change"):
        FiberBundleParams(vol_min=10, vol_max=50, ws=10)  # the reference CLI's defaults
    assert FiberBundleParams(vol_min=10, vol_max=51, ws=10).vol_max == 51
