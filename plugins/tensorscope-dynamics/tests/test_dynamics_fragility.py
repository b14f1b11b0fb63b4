"""dynamics.fragility: JSD in bits against the spec's closed forms and scipy, sigma 0 -> 0,
and a model with uniform predictions that no perturbation moves."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from transformers import AutoModelForCausalLM

from tensorscope_core import RunConfig, analyze
from tensorscope_core.plugin_api import js_divergence_bits
from tensorscope_core.testing import check_declared_cost, check_declared_passes, random_token_data

IDS = random_token_data(64, n=6, length=8, seed=4)
PARAMS = {"sigmas": [0.0, 0.5], "rhos": [0.0, 0.2], "n_directions": 2, "max_batches": 2}


def test_jsd_closed_forms_and_scipy():
    """Spec: [1, 0] vs [0.5, 0.5] -> 0.3113 bits; disjoint supports -> 1; scipy returns the square root."""
    one_vs_half = js_divergence_bits(torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]))
    assert float(one_vs_half) == pytest.approx(0.311278, abs=1e-6)
    assert float(js_divergence_bits(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.5, 0.5]))) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    p, q = rng.dirichlet(np.ones(7), size=5), rng.dirichlet(np.ones(7), size=5)
    want = [jensenshannon(a, b, base=2) ** 2 for a, b in zip(p, q, strict=True)]
    assert js_divergence_bits(torch.from_numpy(p), torch.from_numpy(q)).tolist() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_zero_noise_gives_zero_and_noise_moves_predictions(models, family):
    res = analyze(
        models[family],
        data=["the cat sat on the mat", "a dog ran", "the old house", "one two three"],
        metrics=["dynamics.fragility"],
        params={"dynamics.fragility": PARAMS},
        config=RunConfig(batch_size=2),
    )
    result = res.get("dynamics.fragility")
    assert result.ok, result.reason
    check_declared_passes(result)
    check_declared_cost(result)
    for field in ("input_curve", "weight_curve"):
        zero, moved = result.value(field).rows
        assert zero[1] == pytest.approx(0.0, abs=1e-9) and moved[1] > 1e-6
        assert moved[2] <= moved[1] <= moved[3]  # the bootstrap CI holds the mean
    assert result.values["input_fragility"].unit == "bits" and len(result.values["input_fragility"].samples) == 4


def test_uniform_predictions_do_not_move(bare_gpt2):
    """A zero unembedding predicts uniformly whatever the input, and its filter-normalised
    direction is zero (every row has norm 0): F = 0 at every sigma and rho."""
    model = AutoModelForCausalLM.from_pretrained(bare_gpt2, attn_implementation="eager")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied: the token embedding is zero too
    res = analyze(
        model,
        data=IDS,
        metrics=["dynamics.fragility"],
        params={"dynamics.fragility": PARAMS},
        config=RunConfig(batch_size=3),
    )
    result = res.get("dynamics.fragility")
    for field in ("input_curve", "weight_curve"):
        assert [row[1] for row in result.value(field).rows] == pytest.approx([0.0, 0.0], abs=1e-12)
    assert not math.isnan(result.value("weight_fragility"))
