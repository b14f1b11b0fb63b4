"""geometry.sample_outliers: points placed by hand in a model's final representation (a grid and one far
point, a hand-computed MAD), a float64 brute-force pairwise-distance reference, skips and costs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from geometry_activations_reference import activations
from transformers import AutoModelForCausalLM

from tensorscope_core import RunConfig, analyze
from tensorscope_core.plugin_api import BadParameterError
from tensorscope_core.testing import check_declared_cost, check_declared_passes, check_roundtrip, tiny_model

METRIC = "geometry.sample_outliers"
F64 = RunConfig(batch_size=4, dtype="float64")


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    return tiny_model("gpt2", tmp_path_factory.mktemp("outliers") / "gpt2", with_tokenizer=False)


def placed(folder, points: np.ndarray):
    """A GPT-2 whose final representation of the sequence [3, 4 + i] is ``points[i]`` (in the first
    dims): every block adds 0 (attention and MLP output projections zeroed), no position embedding, and
    token 4 + i embeds as points[i]; mean pooling from position 1 reads that token alone."""
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").double().eval()
    with torch.no_grad():
        for block in model.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
        model.transformer.wpe.weight.zero_()
        rows = torch.arange(4, 4 + len(points))
        model.transformer.wte.weight[rows] = 0.0
        model.transformer.wte.weight[rows, :points.shape[1]] = torch.from_numpy(points)
    data = torch.stack([torch.full((len(points),), 3), torch.arange(4, 4 + len(points))], dim=1)
    return model, data


def test_grid_and_one_far_point(gpt2_folder):
    """Known answer: a 5 x 5 unit grid and a point D = 10 above its top-middle node, k = 5. Grid nodes: 5th
    neighbour at sqrt 2 (21 nodes) or 2 (the 4 corners); the far point's 5th nearest are (2,4), (1,4), (3,4),
    (0,4), (4,4): sqrt(D^2 + 4). Median sqrt 2; more than half tie, so MAD = 0 and the scale is 1.253314 x
    the mean absolute deviation; the far point's z is the largest."""
    d = 10.0
    grid = np.array([[i, j] for i in range(5) for j in range(5)], dtype=float)
    points = np.vstack([grid, [[2.0, 4.0 + d]]])
    model, data = placed(gpt2_folder, points)
    result = analyze(model, data=data, metrics=[METRIC], config=F64).get(METRIC)
    assert result.ok, result.reason
    far = math.sqrt(d * d + 4)
    corners = {0, 4, 20, 24}
    expected = np.array([2.0 if i in corners else math.sqrt(2) for i in range(25)] + [far])
    np.testing.assert_allclose(result.values["distance"].samples, expected, rtol=1e-12)
    mean_ad = (4 * (2 - math.sqrt(2)) + far - math.sqrt(2)) / 26
    z = np.array(result.values["robust_z"].samples)
    assert z[25] == pytest.approx((far - math.sqrt(2)) / (1.253314 * mean_ad), rel=1e-12)
    assert int(np.argmax(z)) == 25 and result.value("robust_z") == z[25]
    assert result.value("distance") == pytest.approx(math.sqrt(2), rel=1e-12) and result.value("mad") == 0.0
    assert result.values["outliers"].rows[0][0] == 25 and "MAD is 0" in result.values["notes"].text


def test_hand_computed_mad(gpt2_folder):
    """Points 0, 1, 3, 6, 10, 15, 21 on a line, k = 1: nearest distances 1, 1, 2, 3, 4, 5, 6; median 3,
    |d - 3| = 2, 2, 1, 0, 1, 2, 3 so MAD = 2; z = (d - 3) / (1.4826 * 2); only 21 (z = 1.0117) passes 1.0."""
    points = np.array([[0.0], [1.0], [3.0], [6.0], [10.0], [15.0], [21.0]])
    model, data = placed(gpt2_folder, points)
    result = analyze(model, data=data, metrics=[METRIC], config=F64,
                     params={METRIC: {"k": 1, "threshold": 1.0, "pooling": "last"}}).get(METRIC)
    distances = np.array([1, 1, 2, 3, 4, 5, 6], dtype=float)
    np.testing.assert_allclose(result.values["distance"].samples, distances, rtol=1e-12)
    assert result.value("mad") == pytest.approx(2.0, rel=1e-12)
    np.testing.assert_allclose(result.values["robust_z"].samples, (distances - 3) / (1.4826 * 2), rtol=1e-12)
    assert result.value("n_outliers") == 1 and result.values["outliers"].rows[0][0] == 6


def brute_force(resid: list[list[torch.Tensor]], k: int, metric: str, pooling: str) -> np.ndarray:
    """k-th neighbour distances from the full float64 pairwise matrix (no sklearn)."""
    pooled = torch.stack([r[-1][1:].mean(0) if pooling == "mean" else r[-1][-1] for r in resid]).numpy()
    if metric == "cosine":
        unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        pairwise = 1.0 - unit @ unit.T
    else:
        pairwise = np.sqrt(((pooled[:, None, :] - pooled[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(pairwise, np.inf)
    return np.sort(pairwise, axis=1)[:, k - 1]


@pytest.mark.parametrize("family,metric,pooling", [("gpt2", "euclidean", "mean"), ("llama", "cosine", "mean"),
                                                   ("bert", "euclidean", "last")])
def test_matches_brute_force_pairwise_reference(family, metric, pooling, tmp_path):
    """Reference: each sequence alone (unpadded), the last block's output hooked by hand, pooled and compared
    in float64 through the full pairwise matrix; the metric sees padded batches (BERT without a mask token:
    its input is the sequence itself)."""
    folder = tiny_model(family, tmp_path / family, with_tokenizer=False)
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randint(4, 64, (int(n),), generator=gen) for n in torch.randint(3, 12, (14,), generator=gen)]
    res = analyze(folder, data=rows, metrics=[METRIC], config=RunConfig(batch_size=4),
                  params={METRIC: {"k": 3, "metric": metric, "pooling": pooling}})
    result = res.get(METRIC)
    assert result.ok, result.reason
    resid, _ = activations(folder, rows)
    expected = brute_force(resid, 3, metric, pooling)
    np.testing.assert_allclose(result.values["distance"].samples, expected, rtol=2e-4, atol=1e-7)
    median = np.median(expected)
    mad = np.median(np.abs(expected - median))
    np.testing.assert_allclose(result.values["robust_z"].samples, (expected - median) / (1.4826 * mad),
                               rtol=2e-3, atol=2e-3)
    assert result.passes_declared == {} and result.model_calls == 0
    check_declared_passes(result)
    check_declared_cost(result)
    assert res.record.models[0].passes == {"forward": 4}
    check_roundtrip(res, tmp_path / "out")


@pytest.mark.parametrize("params,why", [({"k": 5}, "at least 6"), ({"layer": 9}, "out of range")])
def test_degenerate_inputs_are_skipped(params, why, gpt2_folder):
    result = analyze(gpt2_folder, data=torch.randint(4, 64, (5, 6)), metrics=[METRIC], params={METRIC: params}).get(
        METRIC)
    assert result.status == "skipped" and why in result.reason


def test_bad_parameters_are_refused(gpt2_folder):
    with pytest.raises(BadParameterError):
        analyze(gpt2_folder, data=torch.randint(4, 64, (8, 6)), metrics=[METRIC], params={METRIC: {"k": 0}})
