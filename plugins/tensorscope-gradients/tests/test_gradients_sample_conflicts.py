"""gradients.sample_conflicts: planted opposite-gradient pairs are found with FDR control on the rest."""

from __future__ import annotations

import pytest
import torch
from gradients_reference import example_grads, load_hf

from tensorscope_core import RunConfig, analyze
from tensorscope_core.testing import check_declared_cost

METRIC = "gradients.sample_conflicts"
CONFIG = RunConfig(batch_size=8)


def run(folder, data, **params):
    res = analyze(folder, data=data, metrics=[METRIC], params={METRIC: params}, config=CONFIG)
    result = res.get(METRIC)
    assert result.status == "ok", result.reason
    return res, result


def significant_pairs(result) -> set[tuple[int, int]]:
    return {(row[1], row[3]) for row in result.values["significant_pairs"].rows}


def test_planted_pairs_are_found_and_nothing_else(planted):
    """GPT-2, tasks of 12 two-token examples each; pairs (a_k, b_k), k < 3, have exactly
    opposite gradients (see plant_conflicts). Those three, and only those, are significant at
    FDR 0.05; they head the table with cosine -1."""
    p = planted["gpt2"]
    res, result = run(p.folder, {"a": p.a, "b": p.b})
    assert significant_pairs(result) == {(0, 0), (1, 1), (2, 2)}
    assert result.value("n_significant") == 3
    top = result.values["top_pairs"].rows[:3]
    assert {(r[1], r[3]) for r in top} == {(0, 0), (1, 1), (2, 2)}
    assert all(r[0] == "a" and r[2] == "b" and r[4] == pytest.approx(-1.0, abs=1e-6) for r in top)
    assert all(r[7] < 0.05 and r[5] < -10 for r in top)  # q-value, standardised effect
    assert all(not r[8] for r in result.values["top_pairs"].rows[3:])
    assert result.value("n_pairs") == 144
    q = res.tensor(METRIC, "q_values")
    assert torch.isnan(q[:12, :12]).all() and torch.equal(q[:12, 12:], q[12:, :12].T)
    check_declared_cost(result)


def test_no_planted_pairs_no_discoveries(planted):
    """The same model, the planted examples of both tasks replaced by ordinary ones (unused
    tokens whose contexts the planting left alone): no pair is significant."""
    p = planted["gpt2"]
    a, b, k = p.a.clone(), p.b.clone(), p.k
    a[:k] = torch.tensor([p.spare[:k], p.spare[8:8 + k]]).T
    b[:k] = torch.tensor([p.spare[k:2 * k], p.spare[8 + k:8 + 2 * k]]).T
    _, result = run(p.folder, {"a": a, "b": b})
    assert result.value("n_significant") == 0
    assert min(r[7] for r in result.values["top_pairs"].rows) > 0.05


def test_llama_planted_pairs_rank_first(planted):
    """LLaMA: the planted pairs are the most significant conflicts by far. Its cross-task
    cosines between short examples have a heavy-tailed bulk, so the normal empirical null also
    flags weaker atypical pairs (cosines around -0.05); the effect-size floor min_conflict
    leaves exactly the planted ones (the README discusses this limitation)."""
    p = planted["llama"]
    _, result = run(p.folder, {"a": p.a, "b": p.b})
    top = result.values["top_pairs"].rows
    assert {(r[1], r[3]) for r in top[:3]} == {(0, 0), (1, 1), (2, 2)}
    assert all(r[8] for r in top[:3]) and all(r[4] > -0.5 for r in top[3:])
    _, floored = run(p.folder, {"a": p.a, "b": p.b}, min_conflict=0.5)
    assert significant_pairs(floored) == {(0, 0), (1, 1), (2, 2)}


@pytest.mark.parametrize("compression", ["int8", "int8_zlib"])
def test_compressed_cosines_within_reported_bound(planted, tokenizer, compression):
    """Exact (float64) cosines equal single-example backward passes; compressed ones lie within
    the per-pair bound from the reported reconstruction errors; the same pairs are found."""
    p = planted["gpt2"]
    data = {"a": p.a, "b": p.b}
    exact_res = analyze(p.folder, data=data, metrics=[METRIC], config=CONFIG.model_copy(update={"dtype": "float64"}))
    exact = exact_res.tensor(METRIC, "cosines")
    grads = example_grads(load_hf(p.folder), list(torch.cat([p.a, p.b])))
    norms = grads.norm(dim=1)
    torch.testing.assert_close(exact, grads @ grads.T / (norms[:, None] * norms[None, :]), rtol=1e-9, atol=1e-12)
    res, result = run(p.folder, data, compression=compression)
    errors = torch.tensor(result.value("reconstruction_error"), dtype=torch.float64)
    assert 0 < float(errors.max()) < 0.05
    bound = errors[:, None] + errors[None, :] + errors[:, None] * errors[None, :]
    assert ((res.tensor(METRIC, "cosines") - exact).abs() <= bound + 1e-6).all()  # 1e-6: float32 run vs float64
    assert result.value("cosine_error_bound") == pytest.approx(float(bound[:12, 12:].max()), rel=1e-9)
    assert significant_pairs(result) == {(0, 0), (1, 1), (2, 2)}
    _, plain = run(p.folder, data)
    assert result.value("stored_bytes") < plain.value("stored_bytes") / 3.5  # int8 vs float32
    if compression == "int8":
        check_declared_cost(result)
    else:  # zlib's size depends on the data: the declared int8 size is an upper bound
        assert result.measured_bytes <= result.declared_bytes


def test_skipped_without_two_tasks(models, texts):
    res = analyze(models["llama"], data={"only": texts}, metrics=[METRIC], config=CONFIG)
    assert res.get(METRIC).status == "skipped"
    assert "at least 2 named tasks" in res.get(METRIC).reason
