"""geometry.effective_rank: closed forms, streaming = one-shot SVD, and hooks on real models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from geometry_activations_reference import activations, stacked
from tensorscope_geometry.spectra import (
    CovarianceAccumulator,
    covariance_singular_values,
    effective_rank,
    participation_ratio,
)
from transformers import AutoModelForCausalLM

from tensorscope_core.testing import check_declared_cost, run_metric, tiny_model

DIAG_3_1 = 1.754765  # metric-specs.md section 7: erank(diag(3, 1))


def _np_erank(x: np.ndarray) -> float:
    s = np.linalg.svd(x, compute_uv=False)
    p = s[s > 0] / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def _np_pr(x: np.ndarray) -> float:
    lam = np.linalg.svd(x, compute_uv=False) ** 2
    return float(lam.sum() ** 2 / (lam ** 2).sum())


@pytest.mark.parametrize("n", [1, 3, 7])
def test_identity_has_full_effective_rank(n):
    assert effective_rank(torch.linalg.svdvals(torch.eye(n, dtype=torch.float64))) == pytest.approx(n, rel=1e-12)
    assert participation_ratio(torch.ones(n)) == pytest.approx(n, rel=1e-12)


def test_rank_one_and_diag_3_1():
    u, v = torch.randn(6, 1, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64)
    assert effective_rank(torch.linalg.svdvals(u @ v)) == pytest.approx(1.0, abs=1e-6)  # tiny rounding values
    assert effective_rank(torch.linalg.svdvals(torch.diag(torch.tensor([3.0, 1.0])))) == pytest.approx(
        DIAG_3_1, abs=5e-7)
    assert participation_ratio(torch.tensor([9.0, 1.0])) == pytest.approx(100 / 82)
    assert effective_rank(torch.zeros(3)) == 0.0


def test_accumulator_on_data_with_known_spectrum():
    """Rows +-(3, 0), +-(0, 1): centred scatter diag(18, 2), singular values 3 sqrt2 and sqrt2 (ratio 3:1)."""
    acc = CovarianceAccumulator(2)
    acc.add(torch.tensor([[3.0, 0.0], [0.0, 1.0]]) + 5.0)  # a common offset the centring removes
    acc.add(torch.tensor([[-3.0, 0.0], [0.0, -1.0]]) + 5.0)
    s, lam = covariance_singular_values(acc.scatter)
    assert torch.allclose(s, torch.tensor([math.sqrt(18), math.sqrt(2)], dtype=torch.float64), atol=1e-12)
    assert effective_rank(s) == pytest.approx(DIAG_3_1, abs=5e-7)
    assert participation_ratio(lam) == pytest.approx(400 / 328)


@pytest.mark.parametrize("splits", [[50], [1, 1, 48], [7, 13, 20, 10]])
def test_accumulated_equals_one_shot_svd(splits):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(50, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 6, generator=gen,
                                                                             dtype=torch.float64) + 1e3
    acc = CovarianceAccumulator(6)
    for part in torch.split(x, splits):
        acc.add(part)
    centred = (x - x.mean(0)).numpy()
    s, lam = covariance_singular_values(acc.scatter)
    assert np.allclose(s.numpy(), np.linalg.svd(centred, compute_uv=False), rtol=1e-9)
    assert effective_rank(s) == pytest.approx(_np_erank(centred), rel=1e-10)
    assert participation_ratio(lam) == pytest.approx(_np_pr(centred), rel=1e-10)
    assert acc.count == 50 and torch.allclose(acc.mean, x.mean(0), rtol=1e-12)


@pytest.fixture(scope="module")
def ragged(tokenizer):
    """Sequences of different lengths, so batches are padded."""
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(4, len(tokenizer), (length,), generator=gen) for length in (9, 16, 5, 12, 16, 3, 8)]


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # BERT: test_bert_without_mask_token
def test_activations_match_hooks_on_unpadded_sequences(family, models, ragged):
    result = run_metric("geometry.effective_rank", models[family], ragged,
                        params={"sources": ["resid", "mlp_hidden"]}, batch_size=3)
    resid, mlp = activations(models[family], ragged)
    for source, per_seq in (("resid", resid), ("mlp_hidden", mlp)):
        layers = [x - x.mean(0) for x in stacked(per_seq, range(len(ragged)))]
        assert result.value(f"{source}_erank") == pytest.approx([_np_erank(x.numpy()) for x in layers], rel=1e-5)
        assert result.value(f"{source}_participation_ratio") == pytest.approx(
            [_np_pr(x.numpy()) for x in layers], rel=1e-5)
    check_declared_cost(result)


def test_bert_without_mask_token(tmp_path):
    """Without a mask token the encoder's input is the batch itself, so hooks see the same input."""
    folder = tiny_model("bert", tmp_path / "bert", with_tokenizer=False)
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(4, 64, (n,), generator=gen) for n in (6, 11, 4, 9)]
    result = run_metric("geometry.effective_rank", folder, rows, params={"weights": False}, batch_size=2)
    resid, _ = activations(folder, rows)
    want = [_np_erank((x - x.mean(0)).numpy()) for x in stacked(resid, range(len(rows)))]
    assert result.value("resid_erank") == pytest.approx(want, rel=1e-5)
    assert "weights" not in result.values
    check_declared_cost(result)


def test_weight_matrix_with_known_singular_values(tmp_path, tokenizer):
    """A block matrix set to singular values (3, 1, 0, ...) has erank 1.754765; the others match numpy."""
    folder = tiny_model("gpt2", tmp_path / "gpt2")
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        w = model.transformer.h[1].mlp.c_proj.weight  # [d_mlp, d_model]
        w.zero_()
        w[0, 0], w[1, 1] = 3.0, 1.0
    model.save_pretrained(folder)
    result = run_metric("geometry.effective_rank", folder, ["the cat sat on the mat"])
    table = result.values["weights"]
    rows = {r[1]: dict(zip(table.columns, r, strict=True)) for r in table.rows}
    assert rows["transformer.h.1.mlp.c_proj.weight"]["erank"] == pytest.approx(DIAG_3_1, abs=5e-7)
    assert rows["transformer.h.1.mlp.c_proj.weight"]["layer"] == 1
    attn = rows["transformer.h.0.attn.c_attn.weight"]
    c_attn = model.transformer.h[0].attn.c_attn.weight.detach().double().numpy()
    assert attn["erank"] == pytest.approx(_np_erank(c_attn), rel=1e-10)
    assert attn["erank_fraction"] == pytest.approx(attn["erank"] / 32)
    assert rows["transformer.wte.weight"]["layer"] is None  # the tied embedding, listed once
    assert "lm_head.weight" not in rows
    assert len(result.value("weights_erank_fraction")) == 2
