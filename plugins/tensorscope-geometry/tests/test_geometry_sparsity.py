"""superposition.sparsity: the polysemanticity proxy on hand-built activations, and hooks on real models."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch
from geometry_activations_reference import activations, stacked
from tensorscope_geometry.sparsity import SuperpositionSparsity, merge_top_k, token_perplexity

from tensorscope_core import analyze
from tensorscope_core.testing import check_declared_cost, check_roundtrip, run_metric, tiny_model


def test_token_perplexity_on_hand_built_units():
    values = torch.tensor([[5.0, 0.0, -1.0],  # only token 7 fires: 1
                           [1.0, 1.0, -math.inf],  # tokens 7 and 9 equally: 2
                           [2.0, 1.0, 1.0],  # shares 1/2, 1/4, 1/4: exp(1.5 ln 2) = 2^1.5
                           [3.0, 1.0, 0.0],  # one token twice: 1
                           [0.0, -2.0, -math.inf]])  # never positive: NaN
    ids = torch.tensor([[7, 3, 9], [7, 9, -1], [5, 6, 8], [4, 4, 2], [1, 2, -1]])
    got = token_perplexity(values, ids)
    assert got[:4].tolist() == pytest.approx([1.0, 2.0, 2 ** 1.5, 1.0], abs=1e-12)
    assert math.isnan(float(got[4]))


def test_streaming_top_k_equals_one_sort():
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(5, 40, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, 9, (40,), generator=gen)
    values, ids = torch.full((5, 6), -math.inf, dtype=torch.float64), torch.full((5, 6), -1)
    for part in torch.split(torch.arange(40), [3, 20, 1, 16]):
        values, ids = merge_top_k(values, ids, acts[:, part], tokens[part], 6)
    order = torch.argsort(acts, dim=1, descending=True, stable=True)[:, :6]
    assert torch.equal(values, acts.gather(1, order)) and torch.equal(ids, tokens[order])


def test_dead_unit_warning():
    from tensorscope_core import LayerValue, MetricResult

    result = MetricResult(metric="superposition.sparsity", version="1", plugin="g", status="ok",
                          values={"dead_fraction": LayerValue(values=[0.1, 0.25])})
    [warning] = SuperpositionSparsity.interpret(result)
    assert warning.where == "layer 1" and "25%" in warning.text


def _reference(acts: torch.Tensor, tokens: torch.Tensor, threshold: float, k: int) -> dict[str, np.ndarray]:
    """Sparsity and the proxy from all tokens' activations [N, units] at once (numpy, float64)."""
    a, t = acts.numpy(), tokens.numpy()
    active = np.abs(a) > threshold
    poly = []
    for unit in range(a.shape[1]):
        top = np.argsort(-a[:, unit], kind="stable")[:k]
        mass: dict[int, float] = defaultdict(float)
        for i in top:
            mass[int(t[i])] += max(a[i, unit], 0.0)
        p = np.array([m for m in mass.values() if m > 0])
        p = p / p.sum() if len(p) else p
        poly.append(float(np.exp(-(p * np.log(p)).sum())) if len(p) else math.nan)
    return {"zero": 1 - active.mean(0), "l0": active.sum(1).mean(), "l0_std": active.sum(1).std(),
            "poly": np.array(poly)}


@pytest.fixture(scope="module")
def ragged(tokenizer):
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(4, len(tokenizer), (n,), generator=gen) for n in (9, 16, 5, 12, 16, 3, 8)]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_matches_hooks_on_unpadded_sequences(family, models, ragged):
    params = {"threshold": 0.05 if family == "gpt2" else 0.002, "top_k": 4}
    result = run_metric("superposition.sparsity", models[family], ragged, params=params, batch_size=3)
    _, mlp = activations(models[family], ragged)
    tokens = torch.cat(ragged)
    zero = torch.from_numpy(np.stack([_reference(x, tokens, params["threshold"], 4)["zero"]
                                      for x in stacked(mlp, range(len(ragged)))]))
    for layer, x in enumerate(stacked(mlp, range(len(ragged)))):
        ref = _reference(x, tokens, params["threshold"], 4)
        assert result.value("l0")[layer] == pytest.approx(ref["l0"], rel=1e-9)
        assert result.value("l0_std")[layer] == pytest.approx(ref["l0_std"], rel=1e-6)
        assert result.value("layer_polysemanticity")[layer] == pytest.approx(ref["poly"].mean(), rel=1e-5)
    got = result.values["zero_fraction"]
    assert got.shape == list(zero.shape)
    assert 0.05 < float(zero.mean()) < 0.95  # the threshold splits the units' values: a real test
    assert result.value("layer_zero_fraction") == pytest.approx(zero.mean(1).tolist(), abs=1e-12)
    assert result.value("n_tokens") == sum(len(r) for r in ragged)
    check_declared_cost(result)


def test_bert_and_dead_units(tmp_path):
    """An encoder (no mask token, so its input is the batch) with one MLP unit forced dead."""
    from transformers import AutoModelForMaskedLM

    folder = tiny_model("bert", tmp_path / "bert", with_tokenizer=False)
    model = AutoModelForMaskedLM.from_pretrained(folder)
    with torch.no_grad():  # unit 3 of layer 0: GELU(-100) = 0 on every token
        model.bert.encoder.layer[0].intermediate.dense.weight[3].zero_()
        model.bert.encoder.layer[0].intermediate.dense.bias[3] = -100.0
    model.save_pretrained(folder)
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(4, 64, (n,), generator=gen) for n in (6, 11, 4, 9)]
    result = run_metric("superposition.sparsity", folder, rows, params={"top_k": 3}, batch_size=2)
    _, mlp = activations(folder, rows)
    ref = _reference(stacked(mlp, range(4))[0], torch.cat(rows), 0.01, 3)
    assert result.value("dead_fraction")[0] == pytest.approx(1 / 64)
    assert result.value("l0")[0] == pytest.approx(ref["l0"], rel=1e-9)
    assert result.value("layer_polysemanticity")[0] == pytest.approx(np.nanmean(ref["poly"]), rel=1e-5)
    assert math.isnan(ref["poly"][3])  # the dead unit has no positive activation: no proxy
    assert SuperpositionSparsity.interpret(result) == []  # 1 of 64 dead is under the 10% warning


def test_tensors_round_trip(models, ragged, tmp_path):
    res = analyze(models["gpt2"], data=ragged, metrics=["superposition.sparsity", "superposition.features"])
    assert res.tensor("superposition.sparsity", "polysemanticity").shape == (2, 128)
    assert res.tensor("superposition.features", "feature_dimensionality").shape == (2, 128)
    check_roundtrip(res, tmp_path / "out")
