"""structure.separability against known answers: the Bayes accuracy Phi(|delta|/2) of two Gaussians,
chance and MMD^2 ~ 0 on one distribution, a brute-force float64 MMD^2 on hand-hooked resid means, the
permutation p-value on a null, BH across layers, the ladder's rungs and the skips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from structure_reference import brute_mmd2, gaussian_gpt2, median_distance, resid_means
from tensorscope_structure.two_sample import mmd_test
from transformers import AutoModelForCausalLM

from tensorscope_core import RunConfig, analyze, builtin_corpus
from tensorscope_core.testing import check_declared_cost, random_token_data, run_at_rung

METRIC = "structure.separability"
GAUSS = RunConfig(batch_size=200, max_length=4, seed=2)


def phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


@pytest.mark.parametrize("delta", [1.0, 2.0])
def test_two_gaussians_reach_the_bayes_accuracy(delta):
    """N(0, I) vs N(delta e_1, I) in 4 dimensions, 600 draws each: the probe's held-out accuracy is the
    Bayes accuracy Phi(|delta|/2) within sampling error (SE ~0.011), and the tasks differ (p = 1/(P+1))."""
    model, data = gaussian_gpt2(600, 4, delta)
    result = analyze(model, data=data, metrics=[METRIC], params={METRIC: {"n_permutations": 49}}, config=GAUSS).get(
        METRIC
    )
    assert result.ok, result.reason
    assert result.value("probe_accuracy")[0] == pytest.approx(phi(delta / 2), abs=0.035)
    assert result.value("mmd_p_value")[0] == pytest.approx(1 / 50)
    assert result.value("chance") == 0.5


def test_identical_distributions_give_chance_and_zero_mmd():
    """Both tasks N(0, I): accuracy ~0.5, MMD^2 ~ 0 (unbiased: its SD here is ~1e-3), p not small."""
    model, data = gaussian_gpt2(600, 4, 0.0)
    result = analyze(model, data=data, metrics=[METRIC], params={METRIC: {"n_permutations": 49}}, config=GAUSS).get(
        METRIC
    )
    assert result.value("probe_accuracy")[0] == pytest.approx(0.5, abs=0.05)
    assert abs(result.value("mmd2")[0]) < 3e-3
    assert result.value("mmd_p_value")[0] > 0.05
    assert result.value("mmd_significant")[0] == 0.0


def _tasks(vocab: int) -> dict[str, torch.Tensor]:
    return {
        "low": random_token_data(vocab // 2, n=7, length=6, seed=1),
        "high": random_token_data(vocab, n=6, length=5, seed=2) // 2 + vocab // 2,
    }


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_mmd_matches_brute_force_on_hand_hooked_resid_means(family, models):
    """Independent float64 reference: each unpadded sequence through the model with hooks placed by
    hand, mean over its tokens per resid entry, bandwidth from scipy's pdist median, MMD^2 by loops."""
    model = AutoModelForCausalLM.from_pretrained(models[family]).eval()
    blocks = model.model.layers if family == "llama" else model.transformer.h
    data = _tasks(model.config.vocab_size)
    result = analyze(
        models[family],
        data=data,
        metrics=[METRIC],
        params={METRIC: {"n_permutations": 19}},
        config=RunConfig(batch_size=4, max_length=8),
    ).get(METRIC)
    means = {task: resid_means(model, blocks, list(rows)) for task, rows in data.items()}
    for entry in range(3):
        x, y = means["low"][:, entry], means["high"][:, entry]
        h = median_distance(np.concatenate([x, y]))
        assert result.value("bandwidth")[entry] == pytest.approx(h, rel=1e-6)  # float32 forwards: ~1e-8 apart
        assert result.value("mmd2")[entry] == pytest.approx(brute_mmd2(x, y, h), rel=1e-6)
    assert result.values["tasks"].text == "low (7), high (6)"


def test_p_value_on_a_null_and_at_the_extreme():
    """Exchangeable labels: P(p <= a) <= a and p >= 1/(P+1); labels that split two far clusters: p = 1/(P+1)."""
    rng = np.random.default_rng(0)
    p = np.array(
        [
            mmd_test(torch.from_numpy(rng.normal(size=(16, 3))), np.repeat([0, 1], 8), 2, 19, rng).p_value
            for _ in range(200)
        ]
    )
    assert p.min() >= 1 / 20 - 1e-12
    assert np.mean(p <= 0.1) <= 0.1 + 3 * math.sqrt(0.09 / 200)
    assert p.mean() == pytest.approx(21 / 40, abs=3 * 0.29 / math.sqrt(200))
    far = torch.cat([torch.zeros(8, 3), torch.full((8, 3), 5.0)]) + 0.01 * torch.from_numpy(rng.normal(size=(16, 3)))
    assert mmd_test(far, np.repeat([0, 1], 8), 2, 19, rng).p_value == pytest.approx(1 / 20)


def test_three_tasks_average_the_pairs():
    """Three tasks: the statistic is the mean of the three pairs' MMD^2, each the brute-force value."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(15, 2)) + np.repeat([[0, 0], [1, 0], [0, 2]], 5, axis=0)
    labels = np.repeat([0, 1, 2], 5)
    test = mmd_test(torch.from_numpy(x), labels, 3, 9, rng)
    h = median_distance(x)
    pairs = [brute_mmd2(x[labels == a], x[labels == b], h) for a, b in ((0, 1), (0, 2), (1, 2))]
    np.testing.assert_allclose(test.pairs, pairs, rtol=1e-10)
    assert test.mmd2 == pytest.approx(np.mean(pairs), rel=1e-10)


def test_benjamini_hochberg_across_layers(models):
    """mmd_p_adjusted is scipy's BH of the per-entry p-values; significant where it is below alpha."""
    texts = builtin_corpus()
    data = {"a": texts[:10], "b": texts[25:35]}
    result = analyze(
        models["gpt2"],
        data=data,
        metrics=[METRIC],
        params={METRIC: {"alpha": 0.3}},
        config=RunConfig(batch_size=5, max_length=12),
    ).get(METRIC)
    p = np.array(result.value("mmd_p_value"))
    adjusted = stats.false_discovery_control(p, method="bh")
    np.testing.assert_allclose(result.value("mmd_p_adjusted"), adjusted, rtol=1e-12)
    assert result.value("mmd_significant") == [float(a < 0.3) for a in adjusted]
    check_declared_cost(result)


def test_ladder_rungs(models):
    """float32 rung: the float64 values within float32 rounding; subset rung: exactly the asked run on
    the first 256 sequences of each task."""
    data = {"a": random_token_data(64, n=260, length=2, seed=4), "b": random_token_data(64, n=258, length=2, seed=5)}
    config = RunConfig(batch_size=130, max_length=4)
    params = {"n_permutations": 9, "folds": 3}
    _, asked = run_at_rung(models["gpt2"], data, METRIC, None, config=config, **params)
    _, half = run_at_rung(models["gpt2"], data, METRIC, "float32", config=config, **params)
    np.testing.assert_allclose(half.value("mmd2"), asked.value("mmd2"), rtol=1e-4)
    _, subset = run_at_rung(models["gpt2"], data, METRIC, "first-256-per-task", config=config, **params)
    first = {task: rows[:256] for task, rows in data.items()}
    _, exact = run_at_rung(models["gpt2"], first, METRIC, None, config=config, store_dtype="float32", **params)
    for field in ("probe_accuracy", "mmd2", "mmd_p_value", "bandwidth"):
        assert subset.value(field) == exact.value(field), field
    assert subset.values["tasks"].text == "a (256), b (256)"


def test_fewer_than_two_tasks_is_skipped(models):
    result = analyze(
        models["gpt2"], data=builtin_corpus()[:12], metrics=[METRIC], config=RunConfig(batch_size=4, max_length=8)
    ).get(METRIC)
    assert result.status == "skipped" and "at least 2 named tasks" in result.reason


def test_too_few_sequences_for_the_folds_is_skipped(models):
    texts = builtin_corpus()
    result = analyze(
        models["bert"],
        data={"a": texts[:8], "b": texts[8:11]},
        metrics=[METRIC],
        config=RunConfig(batch_size=4, max_length=8),
    ).get(METRIC)
    assert result.status == "skipped"
    assert "'b' 3" in result.reason and "5-fold" in result.reason and "lower folds" in result.reason
