"""lottery.magnitude_masks and lottery.early_bird: exact masks on hand-made weights, the pruned
loss against a model pruned by hand, sparsity 0 changing nothing, Early-Bird on known sequences."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from tensorscope_merging.lottery import (
    MasksParams,
    early_bird,
    global_masks,
    jaccard,
    layerwise_masks,
    mask_distance,
    overlap_coefficient,
)
from transformers import AutoModelForCausalLM

from tensorscope_core import RunConfig, analyze
from tensorscope_core.plugins import get_registry
from tensorscope_core.testing import check_declared_cost, check_roundtrip, random_token_data, tiny_model

CFG = RunConfig(batch_size=4, max_length=16)
A = torch.tensor([[1.0, -5.0], [3.0, 0.5]])
B = torch.tensor([[2.0, -0.1, 4.0]])


def test_global_masks_share_one_threshold():
    masks = global_masks({"a": A, "b": B}, 3 / 7)  # prunes the 3 smallest |w| of all 7: 0.1, 0.5, 1
    assert masks["a"].tolist() == [[False, True], [True, False]]
    assert masks["b"].tolist() == [[True, False, True]]
    assert all(m.all() for m in global_masks({"a": A, "b": B}, 0.0).values())


def test_layerwise_masks_prune_each_tensor_alone():
    masks = layerwise_masks({"a": A, "b": B}, 0.5)  # a: 2 of 4 pruned (0.5, 1); b: floor(1.5 + 0.5) = 2 of 3
    assert masks["a"].tolist() == [[False, True], [True, False]]
    assert masks["b"].tolist() == [[False, False, True]]


def test_ties_are_broken_by_position():
    masks = global_masks({"w": torch.tensor([1.0, -1.0, 1.0, 2.0])}, 0.5)
    assert masks["w"].tolist() == [False, False, True, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuts_over_slices_equal_a_stable_sort_of_all_entries(monkeypatch, dtype):
    """Slices of 7 entries across tensors, magnitudes drawn from 5 values (ties everywhere): the masks
    are exactly those of a stable sort of the concatenated magnitudes, globally and per tensor."""
    monkeypatch.setattr("tensorscope_merging.lottery.WORK_ENTRIES", 7)
    gen = torch.Generator().manual_seed(0)
    weights = {n: (torch.randint(-5, 6, shape, generator=gen) * 0.25).to(dtype)
               for n, shape in (("a", (4, 6)), ("b", (3,)), ("c", (5, 5)))}

    def by_sort(tensors, sparsity):
        flat = torch.cat([w.reshape(-1) for w in tensors.values()])
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        keep[torch.sort(flat.abs(), stable=True).indices[:math.floor(sparsity * flat.numel() + 0.5)]] = False
        return torch.split(keep, [w.numel() for w in tensors.values()])

    for sparsity in (0.0, 0.3, 0.5, 0.77, 0.99):
        masks = global_masks(weights, sparsity)
        for name, want in zip(weights, by_sort(weights, sparsity), strict=True):
            assert torch.equal(masks[name].reshape(-1), want), (sparsity, name)
        per_tensor = layerwise_masks(weights, sparsity)
        for name, w in weights.items():
            assert torch.equal(per_tensor[name].reshape(-1), by_sort({name: w}, sparsity)[0]), (sparsity, name)


def test_mask_overlaps():
    a = {"m": torch.tensor([True, True, False, False])}
    b = {"m": torch.tensor([True, False, True, False])}
    assert jaccard(a, b) == pytest.approx(1 / 3)
    assert overlap_coefficient(a, b) == pytest.approx(1 / 2)
    assert mask_distance(a, b) == pytest.approx(2 / 4)
    assert mask_distance(a, a) == 0.0 and jaccard(a, a) == 1.0


def test_early_bird_on_a_known_sequence():
    assert early_bird([0.3, 0.2, 0.05, 0.01], 0.1) == 2
    assert early_bird([0.3, 0.2], 0.1) is None
    assert early_bird([], 0.1) is None


def test_sparsities_are_checked():
    with pytest.raises(ValidationError, match=r"\[0, 1\)"):
        MasksParams(sparsities=[0.5, 1.0])
    with pytest.raises(ValidationError, match="distinct"):
        MasksParams(sparsities=[0.5, 0.5])
    assert MasksParams(sparsities=[0.9, 0.1]).sparsities == [0.1, 0.9]


@pytest.fixture(scope="module")
def pruning_run(models, tokenizer):
    ids = random_token_data(len(tokenizer), n=8, length=10, seed=8)
    res = analyze(str(models["gpt2"]), data=ids, metrics=["lottery.magnitude_masks", "basic.loss"],
                  params={"lottery.magnitude_masks": {"sparsities": [0.0, 0.5]}}, config=CFG)
    return ids, res


def test_sparsity_zero_changes_nothing(pruning_run):
    _, res = pruning_run
    result = res.get("lottery.magnitude_masks")
    assert result.ok, result.reason
    dense = result.value("loss_dense")
    assert result.value("loss_global")[0] == dense and result.value("loss_layerwise")[0] == dense
    assert dense == pytest.approx(res.get("basic.loss").value("loss"), rel=1e-6)
    for field in (f for f in result.values if f.startswith("mask/0/")):
        assert bool(res.tensor("lottery.magnitude_masks", field).all()), field
    check_declared_cost(result)


def test_pruned_loss_equals_a_model_pruned_by_hand(pruning_run, models, tmp_path):
    ids, res = pruning_run
    result = res.get("lottery.magnitude_masks")
    model = AutoModelForCausalLM.from_pretrained(models["gpt2"])
    kept, removed = [], []
    with torch.no_grad():
        for name, p in model.named_parameters():
            field = f"mask/0.5/{name}"
            if field in result.values:
                mask = res.tensor("lottery.magnitude_masks", field)
                kept.append(p[mask].abs())
                removed.append(p[~mask].abs())
                p.mul_(mask)
    n_kept, n_removed = sum(len(k) for k in kept), sum(len(r) for r in removed)
    assert n_removed == math.floor(0.5 * (n_kept + n_removed) + 0.5)
    assert float(torch.cat(kept).min()) >= float(torch.cat(removed).max())  # one global threshold
    pruned = analyze(model, data=ids, metrics=["basic.loss"], config=CFG).get("basic.loss").value("loss")
    assert result.value("loss_global")[1] == pytest.approx(pruned, rel=1e-6)
    assert result.value("loss_increase_global")[1] == pytest.approx(pruned - result.value("loss_dense"), abs=1e-6)
    per_block = result.value("block_sparsity/0.5")
    assert len(per_block) == 2 and all(0 < s < 1 for s in per_block)


def test_masks_roundtrip(pruning_run, tmp_path):
    check_roundtrip(pruning_run[1], tmp_path / "out")


def test_early_bird_over_checkpoints(models, tokenizer, tmp_path):
    other = tiny_model("gpt2", tmp_path / "other", seed=1)
    ids = random_token_data(len(tokenizer), n=4, length=8, seed=9)
    run = {"step-1": other, "step-2": models["gpt2"], "step-3": models["gpt2"]}
    res = analyze(run, data=ids, metrics=["lottery.early_bird"],
                  params={"lottery.magnitude_masks": {"sparsities": [0.5]}}, config=CFG)
    result = res.get("lottery.early_bird")
    assert result.ok, result.reason
    d = result.value("distances")
    assert d[1] == 0.0 and 0.3 < d[0] < 0.7  # independent random inits disagree on about half the entries
    assert result.value("early_bird_index") == 1.0 and result.values["early_bird"].text == "step-2"
    pairwise = res.tensor("lottery.early_bird", "pairwise")
    assert torch.equal(pairwise, pairwise.T) and float(pairwise.diagonal().abs().sum()) == 0.0


def test_early_bird_skips_a_single_model(models, tokenizer):
    ids = random_token_data(len(tokenizer), n=4, length=8, seed=9)
    res = analyze(str(models["gpt2"]), data=ids, metrics=["lottery.early_bird"], config=CFG)
    result = res.get("lottery.early_bird")
    assert result.status == "skipped" and "pass at least 2 models" in result.reason


def test_early_bird_names_a_missing_sparsity(models, tokenizer):
    ids = random_token_data(len(tokenizer), n=4, length=8, seed=9)
    res = analyze({"a": models["gpt2"], "b": models["gpt2"]}, data=ids, metrics=["lottery.early_bird"],
                  params={"lottery.magnitude_masks": {"sparsities": [0.8]}}, config=CFG)
    result = res.get("lottery.early_bird")
    assert result.status == "error" and "add 0.5 to its sparsities" in result.reason


@pytest.mark.skipif("fisher.masks" not in get_registry().metrics, reason="the fisher plugin is not installed")
def test_overlap_with_fisher_masks(models, tokenizer):
    ids = random_token_data(len(tokenizer), n=4, length=8, seed=10)
    res = analyze(str(models["gpt2"]), data=ids, metrics=["lottery.magnitude_masks"],
                  params={"lottery.magnitude_masks": {"sparsities": [0.5], "compare_masks": "fisher.masks"}},
                  config=CFG)
    result = res.get("lottery.magnitude_masks")
    assert result.ok, result.reason
    fisher = res.get("fisher.masks")
    names = [f[len("mask/0.5/"):] for f in result.values if f.startswith("mask/0.5/")]
    mine = {n: res.tensor("lottery.magnitude_masks", f"mask/0.5/{n}") for n in names if f"mask/{n}" in fisher.values}
    other = {n: res.tensor("fisher.masks", f"mask/{n}").bool() for n in mine}
    assert mine
    assert result.value("compare_jaccard")[0] == pytest.approx(jaccard(mine, other), abs=1e-12)
    assert result.value("compare_overlap")[0] == pytest.approx(overlap_coefficient(mine, other), abs=1e-12)
