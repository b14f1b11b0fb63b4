"""sum_of_squares against a float64 reference, on sizes around and far above its row length."""

import pytest
import torch

from tensorscope_core.numerics import sum_of_squares


@pytest.mark.parametrize("shape", [(1,), (4095,), (4096,), (4097,), (3, 5000), (2_000_003,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sum_of_squares_matches_float64(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 1e-3).to(dtype)
    want = x.double().pow(2).sum()
    assert sum_of_squares(x).dtype == torch.float64
    assert torch.allclose(sum_of_squares(x), want, rtol=1e-6 if dtype != torch.bfloat16 else 1e-2)


def test_sum_of_squares_of_empty_and_integer_tensors() -> None:
    assert float(sum_of_squares(torch.empty(0))) == 0.0
    assert float(sum_of_squares(torch.tensor([3, 4]))) == 25.0
