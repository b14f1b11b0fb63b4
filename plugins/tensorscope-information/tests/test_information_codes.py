"""The code lengths behind information.mdl against their closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from tensorscope_information.codes import (
    architecture_bits,
    block_ends,
    elias_gamma_bits,
    online_code_bits,
    quantised_entropy_bits,
    uniform_code_bits,
)


def test_uniform_predictor_costs_n_log2_v():
    """Spec: a uniform predictor costs N log2 V bits, whatever the blocks."""
    n, v = 1000, 50
    y = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(0))

    def uniform(x, y_seen):
        return lambda xs, ys: torch.full((len(ys),), math.log(v), dtype=torch.float64)

    assert online_code_bits(torch.zeros(n, 3), y, v, uniform) == pytest.approx(n * math.log2(v), rel=1e-12)
    assert uniform_code_bits(n, v) == pytest.approx(n * math.log2(v))


def test_block_ends_follow_voita_titov():
    assert block_ends(10_000) == [10, 20, 40, 80, 160, 320, 625, 1250, 2500, 5000, 10_000]
    assert block_ends(50) == [1, 2, 4, 7, 13, 25, 50]  # ceil, at least 1, no empty duplicates


def test_perfect_predictor_pays_only_the_first_block():
    y = torch.arange(1000) % 4

    def perfect(x, y_seen):
        return lambda xs, ys: torch.zeros(len(ys), dtype=torch.float64)

    assert online_code_bits(torch.zeros(1000, 1), y, 4, perfect) == pytest.approx(1 * 2.0)


def test_constant_tensor_costs_nothing():
    assert quantised_entropy_bits(torch.full((64, 64), 0.3)) == 0.0
    assert quantised_entropy_bits(torch.full((64, 64), 0.3), step=0.01) == 0.0


def test_uniform_8_bit_codes_cost_8_bits_per_weight():
    levels = torch.arange(256, dtype=torch.float64).repeat(40)
    weight = -0.5 + levels / 255.0  # every one of the 256 levels from min to max equally often
    assert quantised_entropy_bits(weight, bits=8) / weight.numel() == pytest.approx(8.0, abs=1e-12)


def test_gaussian_weights_cost_the_differential_entropy_minus_log_step():
    """Spec: sigma 0.02, step sigma / 16 -> 1/2 log2(2 pi e sigma^2) - log2 step = 6.047 bits per weight."""
    sigma = 0.02
    weight = sigma * torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    per_weight = quantised_entropy_bits(weight, step=sigma / 16) / weight.numel()
    closed = 0.5 * math.log2(2 * math.pi * math.e * sigma**2) - math.log2(sigma / 16)
    assert closed == pytest.approx(6.05, abs=5e-3)
    assert per_weight == pytest.approx(closed, abs=0.01)


def test_architecture_code_is_elias_gamma():
    assert [elias_gamma_bits(n) for n in (1, 2, 3, 4, 7, 8)] == [1, 3, 3, 5, 5, 7]
    # 2 tensors: count 3 (3 bits); [4, 2]: rank 3 (3) + 5 (5) + 3 (3); [7]: rank 2 (3) + 8 (7); 2 x 64 quantisers
    assert architecture_bits([(4, 2), (7,)]) == 3 + (3 + 5 + 3) + (3 + 7) + 2 * 64
