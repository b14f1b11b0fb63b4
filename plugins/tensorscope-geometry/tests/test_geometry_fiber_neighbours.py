"""The chunked top-k neighbour search equals the dense all-pairs computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from geometry_fiber_reference import dense_sorted_distances
from tensorscope_geometry.neighbours import expansion_error_bound, knn_radii


def cloud(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if kind == "gaussian":
        return torch.randn(257, 16, generator=g)
    if kind == "ties":  # a coarse grid: many exactly equal distances, also at the top-k cut
        return torch.randint(0, 4, (257, 3), generator=g).float()
    if kind == "duplicates":
        x = torch.randn(257, 8, generator=g)
        x[30:60] = x[29]
        return x
    # far from the origin: the expansion ||a||^2 + ||b||^2 - 2ab cancels badly, so no row can be
    # certified and every row takes the exact fallback
    return 1e3 + torch.randn(257, 6, generator=g) * 1e-2


@pytest.mark.parametrize("kind", ["gaussian", "ties", "duplicates", "offset"])
@pytest.mark.parametrize("chunk", [1, 37, 257, 1000])
def test_chunked_equals_dense(kind, chunk):
    x = cloud(kind)
    k = 40
    got = knn_radii(x, k, chunk_size=chunk).numpy()
    want = dense_sorted_distances(x.numpy())[:, :k]  # float64 from the same float32 coordinates
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)
    assert (got[:, 0] == 0).all()


def test_workspace_is_reused_and_k_equal_to_n():
    x = cloud("gaussian")
    workspace = torch.empty(64, 257)
    got = knn_radii(x, 257, chunk_size=64, workspace=workspace).numpy()
    np.testing.assert_allclose(got, dense_sorted_distances(x.numpy()), rtol=1e-13, atol=1e-13)


def test_error_bound_covers_the_float32_expansion():
    """The certificate's bound really bounds |expansion - exact| (else a left-out point could be nearer)."""
    x = cloud("offset").double()
    sq = (x.float() ** 2).sum(1)
    approx = (sq[:, None] + sq[None, :] - 2 * x.float() @ x.float().T).double()
    exact = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    bound = expansion_error_bound(sq.sqrt(), float(sq.max().sqrt()), x.shape[1]).double()
    assert ((approx - exact).abs() <= bound[:, None]).all()
    assert ((approx - exact).abs() > 0).any()  # the expansion is inexact here, so the bound is exercised


def test_reduced_precision_matmul_still_exact():
    """With TF32 / bfloat16 products allowed the bound widens to their roundoff, so results stay exact."""
    x = cloud("gaussian")
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        got = knn_radii(x, 40, chunk_size=64).numpy()
    finally:
        torch.set_float32_matmul_precision(before)
    np.testing.assert_allclose(got, dense_sorted_distances(x.numpy())[:, :40], rtol=1e-13, atol=1e-13)


def test_a_range_of_query_rows():
    x = cloud("ties")
    got = knn_radii(x, 30, chunk_size=16, rows=range(100, 141)).numpy()
    np.testing.assert_allclose(got, dense_sorted_distances(x.numpy())[100:141, :30], rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="contiguous range"):
        knn_radii(x, 30, rows=range(0, 300))


def test_bad_k_is_refused():
    with pytest.raises(ValueError, match="1 <= k"):
        knn_radii(torch.randn(5, 2), 6)
