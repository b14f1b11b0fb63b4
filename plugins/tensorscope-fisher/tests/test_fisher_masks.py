"""fisher.masks and fisher.overlap: hand-made values with exact answers, a numpy reference on a
real run, and the gradients plugin reading the masks by name."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fisher_diagonal_reference import load_causal
from tensorscope_fisher.masks import overlaps, pair_counts, top_mask

from tensorscope_core import RunConfig, analyze, plan
from tensorscope_core.testing import check_roundtrip, random_token_data

CONFIG = RunConfig(batch_size=4, max_length=32, dtype="float64")


def test_top_mask_hand_values():
    v = torch.tensor([3.0, 1.0, 3.0, 2.0, 0.0])
    assert top_mask(v, 40).tolist() == [True, False, True, False, False]  # k = 2
    assert top_mask(v, 50).tolist() == [True, False, True, True, False]  # k = ceil(2.5) = 3
    assert top_mask(v, 100).all()
    assert top_mask(torch.ones(2, 2), 50).tolist() == [[True, True], [False, False]]  # ties: earlier entries
    assert int(top_mask(torch.rand(10, 10), 10).sum()) == 10  # exactly ceil(p n), no rounding slip


def test_overlap_hand_masks():
    """Block 0: A = {0, 1, 2, 3}, B = {2, 3, 4}: Jaccard 2/5, overlap coefficient 2/3. Block 1:
    A = {5}, B = {}: Jaccard 0, coefficient undefined. Block 2: both empty: both undefined."""
    group = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    a = torch.tensor([1, 1, 1, 1, 0, 1, 0, 0], dtype=torch.bool)
    b = torch.tensor([0, 0, 1, 1, 1, 0, 0, 0], dtype=torch.bool)
    counts = pair_counts(a, b, group, 3)
    jaccard, coef = overlaps(counts)
    assert jaccard == [pytest.approx(2 / 5), 0.0, None]
    assert coef == [pytest.approx(2 / 3), None, None]
    (jo,), (co,) = overlaps(counts.sum(dim=1, keepdim=True))
    assert jo == pytest.approx(2 / 6) and co == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def two_tasks(models):
    vocab = load_causal(models["gpt2"]).config.vocab_size
    ids = random_token_data(vocab, n=8, length=8, seed=4)
    return {"math": ids[:4], "code": ids[4:]}


def _expected(values: np.ndarray, percent: float) -> np.ndarray:
    """numpy reference: the k largest, ties to the lower index (lexsort on (index, -value))."""
    k = math.ceil(percent / 100 * values.size - 1e-9)
    order = np.lexsort((np.arange(values.size), -values))
    mask = np.zeros(values.size, dtype=bool)
    mask[order[:k]] = True
    return mask


@pytest.mark.parametrize("scope", ["global", "per_parameter"])
def test_masks_and_overlap_against_numpy(models, two_tasks, scope, tmp_path):
    params = {"fisher.masks": {"top_percent": 7.5, "scope": scope}}
    res = analyze(models["gpt2"], data=two_tasks, metrics=["fisher.overlap"], params=params, config=CONFIG)
    masks, overlap = res.get("fisher.masks"), res.get("fisher.overlap")
    assert masks.ok and overlap.ok, (masks.reason, overlap.reason)
    model = load_causal(models["gpt2"])
    names = [n for n, _ in model.named_parameters()]
    blocks = [int(n.split(".")[2]) if n.startswith("transformer.h.") else 2 for n in names]
    flat = {}
    for seg in ("", "math/", "code/"):
        diag = [res.tensor("fisher.diagonal", f"true/{seg}{n}").numpy().ravel() for n in names]
        if scope == "global":
            want = np.split(_expected(np.concatenate(diag), 7.5), np.cumsum([d.size for d in diag])[:-1])
        else:
            want = [_expected(d, 7.5) for d in diag]
        got = [res.tensor("fisher.masks", f"mask/{seg}{n}").numpy().ravel() for n in names]
        for n, g, w in zip(names, got, want, strict=True):
            assert g.dtype == bool and np.array_equal(g, w), (seg, n)
        flat[seg] = (np.concatenate(got), np.concatenate([np.full(d.size, b) for d, b in zip(diag, blocks,
                                                                                              strict=True)]))
    a, group = flat["math/"]
    b, _ = flat["code/"]
    for block in range(3):
        sa, sb = set(np.nonzero(a & (group == block))[0]), set(np.nonzero(b & (group == block))[0])
        assert overlap.value("jaccard/math/code")[block] == pytest.approx(len(sa & sb) / len(sa | sb))
        assert overlap.value("overlap_coef/math/code")[block] == pytest.approx(len(sa & sb) / min(len(sa), len(sb)))
    sa, sb = set(np.nonzero(a)[0]), set(np.nonzero(b)[0])
    assert overlap.value("jaccard_overall/math/code") == pytest.approx(len(sa & sb) / len(sa | sb))
    assert overlap.value("pairs").rows[0][:5] == ["math", "code", len(sa), len(sb), len(sa & sb)]
    per_block = overlap.values["jaccard/math/code"]  # the blocks and "outside": named entries
    assert per_block.axis == "labelled" and per_block.labels == ["0", "1", "outside"]
    check_roundtrip(res, tmp_path / "out")


def test_identical_tasks_overlap_completely(models, two_tasks):
    """The same texts under two task names: the empirical Fisher (observed labels) is the same,
    so the masks coincide and every overlap is 1."""
    data = {"a": two_tasks["math"], "b": two_tasks["math"]}
    res = analyze(models["llama"], data=data, metrics=["fisher.overlap"],
                  params={"fisher.masks": {"kind": "empirical", "top_percent": 20}}, config=CONFIG)
    overlap = res.get("fisher.overlap")
    assert overlap.ok, overlap.reason
    assert overlap.value("jaccard_overall/a/b") == 1.0 and overlap.value("overlap_coef_overall/a/b") == 1.0
    assert all(v == 1.0 for v in overlap.value("jaccard/a/b"))


def test_overlap_needs_two_tasks(models, two_tasks):
    res = analyze(models["gpt2"], data=two_tasks["math"], metrics=["fisher.overlap"], config=CONFIG)
    result = res.get("fisher.overlap")
    assert result.status == "skipped" and "at least 2 named tasks" in result.reason
    assert res.get("fisher.masks").ok  # pooled masks only


def test_a_pooled_diagonal_gives_pooled_masks_and_the_overlap_says_why_it_has_none(models, two_tasks):
    """fisher.diagonal at its 'pooled' rung (the planner's last step under a tight budget) has no per-task
    fields and the true Fisher only: the masks and the grouped sums are the pooled true ones alone, as in a
    run with per-task fields (to the rung's float32), fisher.overlap ends skipped naming the rung and the
    fix (all three ended in a KeyError), and masks of the empirical Fisher end skipped saying why."""
    metrics = ["fisher.overlap", "fisher.grouped"]
    pooled = analyze(models["gpt2"], data=two_tasks, metrics=metrics, config=CONFIG.model_copy(
        update={"rungs": {"fisher.diagonal": "pooled"}}))
    full = analyze(models["gpt2"], data=two_tasks, metrics=metrics, config=CONFIG)
    masks, grouped = pooled.get("fisher.masks"), pooled.get("fisher.grouped")
    assert masks.ok and grouped.ok, (masks.reason, grouped.reason)
    assert not any(k.startswith(("mask/math/", "mask/code/")) for k in masks.values)
    name = "transformer.h.0.mlp.c_fc.weight"
    assert torch.equal(pooled.tensor("fisher.masks", f"mask/{name}"), full.tensor("fisher.masks", f"mask/{name}"))
    assert not any("/math/" in k or "/code/" in k for k in grouped.values)
    # the pooled rung keeps the diagonal in float32: the same sums to float32 round-off
    assert grouped.value("true/block") == pytest.approx(full.get("fisher.grouped").value("true/block"), rel=1e-5)
    overlap = pooled.get("fisher.overlap")
    assert overlap.status == "skipped" and "'pooled' memory rung" in overlap.reason
    assert "--rung fisher.diagonal=asked" in overlap.reason
    assert not any(k.startswith("empirical/") for k in grouped.values)  # the rung keeps the true Fisher only
    empirical = analyze(models["gpt2"], data=two_tasks, metrics=["fisher.masks"],
                        params={"fisher.masks": {"kind": "empirical"}},
                        config=CONFIG.model_copy(update={"rungs": {"fisher.diagonal": "pooled"}}))
    assert empirical.get("fisher.masks").status == "skipped" and "'true-only'" in empirical.get("fisher.masks").reason


def test_the_masks_declared_are_the_masks_the_diagonals_rung_gives(models, two_tasks):
    """The plan declares one boolean per trainable entry per mask: pooled and per task as asked, pooled
    only when fisher.diagonal runs at its 'pooled' rung (the masks' cost sees the rung); equal to the
    bytes of the mask tensors each run keeps."""
    for rungs, masks in (({}, 3), ({"fisher.diagonal": "pooled"}, 1)):
        config = CONFIG.model_copy(update={"rungs": rungs})
        (planned,) = plan(models["gpt2"], two_tasks, ["fisher.masks"], config=config)
        res = analyze(models["gpt2"], data=two_tasks, metrics=["fisher.masks"], config=config)
        held = [res.tensor("fisher.masks", k) for k in res.get("fisher.masks").values if k.startswith("mask/")]
        entries = sum(p.numel() for p in load_causal(models["gpt2"]).parameters())
        assert planned.declared_results["fisher.masks"] == masks * entries == sum(t.numel() for t in held)


def test_gradients_read_the_masks_by_name(models, two_tasks):
    """gradients.task_conflict on the entries of task 'math''s Fisher mask: masks of 100% give the
    unmasked cosine exactly; 5% masks give another, finite cosine."""
    metric = "gradients.task_conflict"
    plain = analyze(models["gpt2"], data=two_tasks, metrics=[metric], config=CONFIG).get(metric)
    cosines = []
    for percent in (100, 5):
        res = analyze(models["gpt2"], data=two_tasks, metrics=[metric],
                      params={metric: {"mask_metric": "fisher.masks", "mask_field_prefix": "mask/math/"},
                              "fisher.masks": {"top_percent": percent}}, config=CONFIG)
        result = res.get(metric)
        assert result.ok, result.reason
        cosines.append(result.value("cosine"))
    assert cosines[0] == pytest.approx(plain.value("cosine"), rel=1e-12)
    assert math.isfinite(cosines[1]) and cosines[1] != pytest.approx(cosines[0], rel=1e-3)
    # the default prefix 'mask/' reads the pooled masks and passes over the per-task ones beside them
    pooled = analyze(models["gpt2"], data=two_tasks, metrics=[metric],
                     params={metric: {"mask_metric": "fisher.masks"}, "fisher.masks": {"top_percent": 100}},
                     config=CONFIG).get(metric)
    assert pooled.ok, pooled.reason
    assert pooled.value("cosine") == pytest.approx(plain.value("cosine"), rel=1e-12)
