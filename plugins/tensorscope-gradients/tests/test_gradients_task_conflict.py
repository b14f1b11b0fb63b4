"""gradients.task_conflict against float64 per-batch gradients, and on tasks with opposite gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gradients_reference import batch_grads, group_slices, load_hf, padded_batches, pcgrad_reference, tokenize

from tensorscope_core import RunConfig, analyze, builtin_corpus
from tensorscope_core.testing import check_declared_cost, run_metric

METRIC = "gradients.task_conflict"


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_equals_float64_reference(family, models, tokenizer):
    corpus = builtin_corpus()
    data = {"a": corpus[:8], "b": corpus[8:20]}  # 2 and 3 batches of 4
    result = run_metric(METRIC, models[family], data, dtype="float64", max_length=32)
    model = load_hf(models[family])
    ga = batch_grads(model, padded_batches(tokenize(tokenizer, data["a"])))
    gb = batch_grads(model, padded_batches(tokenize(tokenizer, data["b"])))
    ma, mb = ga.mean(0), gb.mean(0)
    rtol = 1e-9 if family == "gpt2" else 1e-6  # LLaMA: float32 rotary angles (see gradients_reference)
    assert result.value("cosine") == pytest.approx(_cos(ma, mb), rel=rtol)
    groups = group_slices(model)[:-1]
    want_layers = [_cos(ma[g], mb[g]) for g in groups]
    assert result.value("layer_cosine") == pytest.approx(want_layers, rel=rtol)
    assert result.value("layer_conflict") == [float(c < 0) for c in want_layers]
    pairs = [_cos(x, y) for x in ga for y in gb]
    assert result.value("conflict_score") == pytest.approx(np.mean([c < 0 for c in pairs]))
    score = result.values["conflict_score"]
    assert score.n == 6 and 0 <= score.ci_low <= score.ci_high <= 1
    projected = pcgrad_reference(torch.stack([ma, mb]).numpy(), [0, 1])
    table = {row[0]: row for row in result.values["pcgrad"].rows}
    for i, task in enumerate(["a", "b"]):
        g = (ma, mb)[i].numpy()
        change = np.linalg.norm(projected[i] - g) / np.linalg.norm(g)
        assert table[task][1] == pytest.approx(change, rel=1e-6, abs=1e-12)
        assert table[task][3] == int(_cos(ma, mb) < 0)
    check_declared_cost(result)


def test_opposite_tasks_conflict_fully(planted):
    """Task 'a' = [c_k, y_k], task 'b' = [c_k, z_k] for the planted pairs: the task gradients are
    exactly opposite, so cos = -1, every batch pair conflicts, and PCGrad removes both
    gradients entirely (g_a - (g_a.g_b/|g_b|^2) g_b = g_a + g_b = 0). (Up to the other tokens'
    probability e^-20 each, which leaves cosines -1 + O(1e-8).)"""
    p = planted["gpt2"]
    data = {"a": p.a[:p.k], "b": p.b[:p.k]}
    result = run_metric(METRIC, p.folder, data, dtype="float64", batch_size=p.k)
    assert result.value("cosine") == pytest.approx(-1.0, abs=1e-6)
    assert result.value("conflict_score") == 1.0
    assert math.isnan(result.values["conflict_score"].ci_low)  # one batch per task: nothing to resample
    for _task, change, _cosine, n_proj in result.values["pcgrad"].rows:
        assert change == pytest.approx(1.0, abs=1e-6) and n_proj == 1


def test_identical_tasks_do_not_conflict(models, texts):
    result = run_metric(METRIC, models["llama"], {"a": texts, "b": texts})
    assert result.value("cosine") == pytest.approx(1.0, abs=1e-6)
    assert result.value("layer_cosine") == pytest.approx([1.0, 1.0], abs=1e-6)
    assert all(row[1] == 0.0 and row[3] == 0 for row in result.values["pcgrad"].rows)


def test_skipped_without_two_tasks(models, texts):
    res = analyze(models["gpt2"], data=texts, metrics=[METRIC], config=RunConfig(batch_size=4))
    result = res.get(METRIC)
    assert result.status == "skipped"
    assert "needs data with at least 2 named tasks" in result.reason
