"""gradients.layer_alignment: the statistics on hand-built Gram matrices, BH by hand, and the metric
against per-example backward passes in float64 on GPT-2, LLaMA and BERT."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gradients_reference import block_of, example_grads, load_hf, tokenize
from scipy import stats
from tensorscope_gradients.maths import bh, task_alignment

from tensorscope_core import RunConfig, analyze, builtin_corpus
from tensorscope_core.testing import check_declared_cost, check_declared_passes, run_metric

METRIC = "gradients.layer_alignment"


def _gram(rows: np.ndarray) -> torch.Tensor:
    x = torch.as_tensor(rows, dtype=torch.float64)
    return (x @ x.T)[None]


def test_identical_gradients_give_cosine_one_and_a_degenerate_ci():
    """Every example of both tasks has the same gradient: cos 1 and every resample 1 (CI [1, 1]); the
    labels are then exchangeable, so every relabelling ties and p = 1 (no evidence beyond chance)."""
    rows = np.tile(np.array([1.0, -2.0, 0.5]), (10, 1))
    out = task_alignment(_gram(rows), np.arange(5), np.arange(5, 10), n_resamples=200, n_permutations=200,
                         level=0.95, seed=0)
    assert out.cosine[0] == pytest.approx(1.0, abs=1e-12)
    assert out.ci_low[0] == pytest.approx(1.0, abs=1e-12) and out.ci_high[0] == pytest.approx(1.0, abs=1e-12)
    assert out.p_value[0] == 1.0


def test_a_copied_task_is_aligned_beyond_chance():
    """Task B holds exactly task A's examples: cos 1 exactly, and only the relabellings that give both
    halves the same multiset tie (2^n of C(2n, n): 2^8 / 12870 = 2%), so p is small."""
    gen = np.random.default_rng(1)
    a = gen.normal(size=(8, 20)) + 0.3
    out = task_alignment(_gram(np.concatenate([a, a])), np.arange(8), np.arange(8, 16), n_resamples=200,
                         n_permutations=2000, level=0.95, seed=0)
    assert out.cosine[0] == pytest.approx(1.0, abs=1e-12)
    assert out.p_value[0] < 0.05
    assert out.chance[0] < 0.9 and out.ci_low[0] < 1.0


def test_p_is_uniform_for_exchangeable_tasks():
    """Examples from one distribution (a shared mean gradient plus noise), labels random: over 200
    seeded repetitions the rejection rate at 0.05 lies in the binomial 99% interval."""
    reps, level = 200, 0.05
    gen = np.random.default_rng(2)
    rejections = 0
    for r in range(reps):
        rows = gen.normal(size=(20, 30)) + 0.2
        labels = gen.permutation(20)
        out = task_alignment(_gram(rows), labels[:10], labels[10:], n_resamples=10, n_permutations=199,
                             level=0.95, seed=r)
        rejections += int(out.p_value[0] <= level)
    low, high = stats.binom.interval(0.99, reps, level)
    assert low <= rejections <= high, rejections


def test_bh_by_hand():
    """p = (0.01, 0.04, 0.03, 0.20), m = 4: sorted m p_(j)/j = 0.04, 0.06, 0.0533, 0.20, step-up minima
    0.04, 0.0533, 0.0533, 0.20 -> q = (0.04, 0.0533, 0.0533, 0.20) in the original order."""
    q = bh([0.01, 0.04, 0.03, 0.20])
    np.testing.assert_allclose(q, [0.04, 0.16 / 3, 0.16 / 3, 0.20], rtol=1e-12)


def _reference(model: torch.nn.Module, rows_a: list[torch.Tensor], rows_b: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per block, outside, all: the Gram matrix [1, N, N] of the per-example gradients (A then B)."""
    g = torch.cat([example_grads(model, rows_a, summed=True), example_grads(model, rows_b, summed=True)])
    owners = block_of(model)
    L = max(o for o in owners if o is not None) + 1
    sizes = [p.numel() for p in model.parameters()]
    labels = torch.cat([torch.full((s,), L if o is None else o) for s, o in zip(sizes, owners, strict=True)])
    grams = [g[:, labels == group] @ g[:, labels == group].T for group in range(L + 1)]
    return [*grams, g @ g.T]


def test_metric_equals_float64_reference_on_gpt2(models, tokenizer):
    """Cosines, CIs, chance levels and p-values per block from per-example backward passes (the same
    seeded statistics on the reference's Gram matrices), BH across blocks and 'outside'."""
    corpus = builtin_corpus()
    data = {"a": corpus[:6], "b": corpus[6:12]}
    result = run_metric(METRIC, models["gpt2"], data, dtype="float64", max_length=32,
                        params={"n_resamples": 200, "n_permutations": 300})
    model = load_hf(models["gpt2"])
    grams = torch.stack(_reference(model, tokenize(tokenizer, data["a"]), tokenize(tokenizer, data["b"])))
    want = task_alignment(grams, np.arange(6), np.arange(6, 12), n_resamples=200, n_permutations=300, level=0.95,
                          seed=0)
    rows = result.values["layers"].rows
    assert [r[2] for r in rows] == ["0", "1", "outside", "all"]
    for g, row in enumerate(rows):
        assert row[3:8] == pytest.approx([want.cosine[g], want.ci_low[g], want.ci_high[g], want.chance[g],
                                          want.p_value[g]], rel=1e-7)
    np.testing.assert_allclose([r[8] for r in rows[:3]], bh(want.p_value[:3]), rtol=1e-12)
    assert result.value("layer_cosine") == pytest.approx(want.cosine[:2].tolist(), rel=1e-9)
    assert result.value("cosine") == pytest.approx(want.cosine[-1], rel=1e-9)
    assert result.values["cosine"].ci_low == pytest.approx(want.ci_low[-1], rel=1e-7)
    check_declared_cost(result)
    check_declared_passes(result)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_runs_on_llama_and_bert(models, bert, family):
    """A task against a copy of itself on LLaMA (cos 1 exactly, p small); BERT (masked LM) runs with its
    seeded masks. The per-example backward is the shared artifact's: the metric makes no call itself."""
    corpus = builtin_corpus()
    folder = bert if family == "bert" else models[family]
    res = analyze(folder, data={"a": corpus[:8], "b": corpus[:8]}, metrics=[METRIC],
                  params={METRIC: {"n_resamples": 100, "n_permutations": 200}},
                  config=RunConfig(batch_size=4, max_length=24))
    result = res.get(METRIC)
    assert result.ok, result.reason
    if family == "llama":
        assert result.value("cosine") == pytest.approx(1.0, abs=1e-6)
        assert result.value("p_value") < 0.05
    assert all(-1 <= c <= 1 for c in result.value("layer_cosine"))
    check_declared_cost(result)
    check_declared_passes(result)


def test_too_few_examples_is_skipped(models):
    corpus = builtin_corpus()
    res = analyze(models["gpt2"], data={"a": corpus[:1], "b": corpus[1:5]}, metrics=[METRIC],
                  config=RunConfig(batch_size=4))
    result = res.get(METRIC)
    assert result.status == "skipped" and "fewer than two examples" in result.reason
