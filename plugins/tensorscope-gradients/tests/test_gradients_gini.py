"""The Gini coefficient of gradients.flow: the sample formula's closed forms, and the metric against
per-batch backward passes in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gradients_reference import batch_grads, group_slices, load_hf, padded_batches, tokenize
from tensorscope_gradients.maths import gini_sorted

from tensorscope_core.testing import check_declared_cost, run_metric

METRIC = "gradients.flow"


def test_gini_closed_forms():
    """All equal -> 0; one non-zero among n -> 1 - 1/n; [1, 2, 3, 4] -> 0.25; nothing -> NaN."""
    assert gini_sorted(np.full(7, 3.0)) == pytest.approx(0.0, abs=1e-15)
    for n in (1, 2, 10, 1000):
        x = np.zeros(n)
        x[-1] = 5.0
        assert gini_sorted(x) == pytest.approx(1 - 1 / n, abs=1e-15)
    assert gini_sorted(np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(0.25, abs=1e-15)
    assert math.isnan(gini_sorted(np.zeros(4))) and math.isnan(gini_sorted(np.zeros(0)))


def test_gini_in_chunks_equals_one_pass(monkeypatch):
    """The chunked sum (GINI_CHUNK entries at a time) equals the mean absolute difference form
    G = sum_ij |x_i - x_j| / (2 n^2 mean) computed over all pairs."""
    import tensorscope_gradients.maths as maths

    x = np.sort(np.random.default_rng(0).exponential(size=1500))
    pairs = np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean())
    monkeypatch.setattr(maths, "GINI_CHUNK", 64)
    assert maths.gini_sorted(x) == pytest.approx(pairs, rel=1e-12)


def _gini(x: torch.Tensor) -> float:
    """Reference: the mean-absolute-difference form on |x| (no sorting)."""
    a = x.abs().double()
    return float((a[:, None] - a[None, :]).abs().sum() / (2 * len(a) ** 2 * a.mean()))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_flow_gini_equals_float64_reference(family, models, texts, tokenizer):
    """Per block, outside and total: the Gini of |mean over batches of the batch gradient| per entry.
    The total (tens of thousands of entries) by the sorted formula on the reference's vector."""
    result = run_metric(METRIC, models[family], texts, dtype="float64", max_length=32)
    model = load_hf(models[family])
    mean = batch_grads(model, padded_batches(tokenize(tokenizer, texts))).mean(dim=0)
    groups = group_slices(model)
    L = model.config.num_hidden_layers
    want = [gini_sorted(np.sort(mean[g].abs().numpy())) for g in groups]
    rtol = 1e-9 if family == "gpt2" else 1e-6
    assert result.value("grad_gini") == pytest.approx(want[:L], rel=rtol)
    assert result.value("outside_grad_gini") == pytest.approx(want[L], rel=rtol)
    assert result.value("total_grad_gini") == pytest.approx(gini_sorted(np.sort(mean.abs().numpy())), rel=rtol)
    small = groups[0].nonzero()[:400, 0]  # the pairwise form on a piece, against the metric's formula
    assert gini_sorted(np.sort(mean[small].abs().numpy())) == pytest.approx(_gini(mean[small]), rel=1e-12)
    check_declared_cost(result)


def test_flow_gini_is_nan_when_sketched(models, texts):
    result = run_metric(METRIC, models["gpt2"], texts, params={"projection_dim": 64})
    assert math.isnan(result.value("total_grad_gini")) and all(math.isnan(v) for v in result.value("grad_gini"))
