"""tensorscope_fisher.lanczos.top_eigenpairs against dense eigh and the closed forms of metric-specs §8."""

from __future__ import annotations

import pytest
import torch
from tensorscope_fisher.lanczos import top_eigenpairs


def _symmetric(n: int, spectrum: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q @ torch.diag(spectrum) @ q.T


def test_top5_match_dense_eigh():
    gen = torch.Generator().manual_seed(1)
    spectrum = torch.cat([torch.tensor([10.0, 9.0, 8.5, 8.0, 7.9], dtype=torch.float64),
                          torch.rand(295, generator=gen, dtype=torch.float64) * 6 - 1])
    a = _symmetric(300, spectrum, seed=3)
    result = top_eigenpairs(lambda v: a @ v, 300, 5)
    dense_values, dense_vectors = torch.linalg.eigh(a)
    expected = dense_values.flip(0)[:5]
    assert result.converged
    assert torch.allclose(result.eigenvalues, expected, rtol=1e-6, atol=0)
    # the eigenvectors span the same directions (up to sign) and the residuals are true ones
    overlap = (result.eigenvectors.T @ dense_vectors.flip(1)[:, :5]).abs().diagonal()
    assert torch.allclose(overlap, torch.ones(5, dtype=torch.float64), atol=1e-6)
    direct = torch.linalg.vector_norm(a @ result.eigenvectors - result.eigenvectors * result.eigenvalues, dim=0)
    assert torch.allclose(result.residual_norms, direct, rtol=1e-6, atol=1e-12)
    assert float(result.residual_norms.max()) < 1e-5


def test_quadratic_diag_5_2_minus1():
    """metric-specs §8 case 2: L = 1/2 w^T H w, H = diag(5, 2, -1): the two largest algebraic are 5, 2."""
    h = torch.diag(torch.tensor([5.0, 2.0, -1.0], dtype=torch.float64))
    result = top_eigenpairs(lambda v: h @ v, 3, 2)
    assert result.eigenvalues.tolist() == pytest.approx([5.0, 2.0], abs=1e-12)
    assert float(result.residual_norms.max()) < 1e-12


def test_no_ghost_copies_of_a_converged_eigenvalue():
    """A dominant eigenvalue converges early; without reorthogonalisation it comes back as a ghost
    among the top 10 after ~100 iterations. Selective reorthogonalisation keeps one copy."""
    spectrum = torch.cat([torch.tensor([100.0], dtype=torch.float64),
                          torch.linspace(0, 1, 599, dtype=torch.float64) ** 3 * 20])
    result = top_eigenpairs(lambda v: spectrum * v, 600, 10, max_iter=300, tol=1e-10)
    expected = spectrum.sort(descending=True).values[:10]
    assert result.iterations > 100
    assert torch.allclose(result.eigenvalues, expected, rtol=1e-8, atol=0)


def test_low_rank_operator_restarts_after_an_invariant_subspace():
    """Rank 20: the Krylov space closes after 20 steps; asking for 25 gives the 20 nonzero ones, then 0."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(200, 20, generator=gen, dtype=torch.float64)
    gram = x @ x.T
    result = top_eigenpairs(lambda v: gram @ v, 200, 25)
    expected = torch.linalg.eigvalsh(gram).flip(0)[:25]
    assert torch.allclose(result.eigenvalues, expected, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("bad", [{"k": 0}, {"k": 4}, {"k": 2, "max_iter": 1}])
def test_bad_arguments_are_refused(bad):
    with pytest.raises(ValueError, match="must"):
        top_eigenpairs(lambda v: v, 3, **bad)
