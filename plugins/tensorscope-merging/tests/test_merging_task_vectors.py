"""merging.task_vectors on fine-tunes built as base + known deltas."""

from __future__ import annotations

import math

import pytest
import torch
from merging_models_reference import finetune, load, registry

from tensorscope_core import analyze
from tensorscope_core.testing import check_declared_cost, tiny_model

FC1 = "transformer.h.1.mlp.c_fc.weight"
WTE = "transformer.wte.weight"  # tied with lm_head: one parameter, counted once


@pytest.fixture(scope="module")
def deltas() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {"a": 0.01 * torch.randn(32, 128, generator=gen, dtype=torch.float64),
            "b": 0.01 * torch.randn(32, 128, generator=gen, dtype=torch.float64),
            "b_wte": 0.01 * torch.randn(340, 32, generator=gen, dtype=torch.float64)}


@pytest.fixture(scope="module")
def finetunes(models, deltas, tmp_path_factory):
    root = tmp_path_factory.mktemp("tv")
    return {"a": finetune(models["gpt2"], root / "a", {FC1: deltas["a"]}),
            "b": finetune(models["gpt2"], root / "b", {FC1: deltas["b"], WTE: deltas["b_wte"]})}


@pytest.fixture(scope="module")
def result(models, finetunes):
    with registry("merging"):
        res = analyze(finetunes, base=models["gpt2"], metrics=["merging.task_vectors"])
    out = res.get("merging.task_vectors")
    assert out.status == "ok", out.reason
    return out


def test_norms_and_shares_are_those_of_the_planted_deltas(result, deltas) -> None:
    na, nb, nw = (float(deltas[k].norm()) for k in ("a", "b", "b_wte"))
    assert result.values["norm/a"].labels == ["0", "1", "outside"]
    assert result.value("norm/a")[0] == 0.0 and result.value("norm/a")[2] == 0.0
    assert result.value("norm/a")[1] == pytest.approx(na, rel=1e-5)
    assert result.value("total_norm/a") == pytest.approx(na, rel=1e-5)
    assert result.value("share/a") == pytest.approx([0.0, 1.0, 0.0], abs=1e-12)
    assert result.value("norm/b") == pytest.approx([0.0, nb, nw], rel=1e-5)  # tied wte counted once
    assert result.value("total_norm/b") == pytest.approx(math.hypot(nb, nw), rel=1e-5)
    assert result.value("share/b") == pytest.approx([0.0, nb**2 / (nb**2 + nw**2), nw**2 / (nb**2 + nw**2)],
                                                    rel=1e-5)
    assert sum(result.value("share/b")) == pytest.approx(1.0, abs=1e-12)


def test_cosines_per_layer_and_overall(result, deltas) -> None:
    da, db, dw = deltas["a"].flatten(), deltas["b"].flatten(), deltas["b_wte"].flatten()
    layer1 = float(da @ db / (da.norm() * db.norm()))
    overall = float(da @ db / (da.norm() * torch.sqrt(db @ db + dw @ dw)))
    layer = result.value("layer_cosine/a/b")
    assert layer[0] is None and layer[2] is None  # a zero task vector has no direction
    assert layer[1] == pytest.approx(layer1, rel=1e-5, abs=1e-6)
    assert result.value("cosine/a/b") == pytest.approx(overall, rel=1e-5, abs=1e-6)
    table = result.values["cosine_matrix"]
    assert table.columns == ["task", "a", "b"]
    assert table.rows[0][0] == "a" and table.rows[0][1] == 1.0
    assert table.rows[0][2] == pytest.approx(overall, rel=1e-5, abs=1e-6) and table.rows[1][1] == table.rows[0][2]


def test_declared_state_is_the_working_block_whatever_the_number_of_fine_tunes(models, finetunes, deltas, result,
                                                                                tmp_path) -> None:
    """The metric holds one float64 working block (on a tiny model, d entries), shared by the tasks'
    rows, so the declaration holds for two fine-tunes and for three."""
    n_params = sum(p.numel() for p in load(models["gpt2"]).parameters())
    assert result.declared_bytes == 8 * n_params
    check_declared_cost(result)
    c = finetune(models["gpt2"], tmp_path / "c", {FC1: -deltas["a"]})
    with registry("merging"):
        res = analyze({**finetunes, "c": c}, base=models["gpt2"], metrics=["merging.task_vectors"])
    out = res.get("merging.task_vectors")
    assert out.status == "ok", out.reason
    assert out.declared_bytes == 8 * n_params and out.measured_bytes == 8 * 3 * (n_params // 3)
    check_declared_cost(out)
    assert out.value("cosine/a/c") == pytest.approx(-1.0, abs=1e-6)
    assert out.value("cosine/a/b") == result.value("cosine/a/b")  # the pairs are those of the two-task run


def test_slices_across_parameters_give_the_whole_vectors_inner_products(models, tmp_path, monkeypatch) -> None:
    """A working block of 999 entries (slices of 333, across parameter boundaries): norms and cosines
    equal those of the whole flat task vectors up to float64 rounding."""
    monkeypatch.setattr("tensorscope_merging.flat.WORK_ENTRIES", 999)
    base = load(models["gpt2"])
    fts, flat = {}, {}
    for i in range(3):
        gen = torch.Generator().manual_seed(20 + i)
        deltas = {n: 0.01 * torch.randn(p.shape, generator=gen, dtype=torch.float64)
                  for n, p in base.named_parameters()}
        fts[f"t{i}"] = finetune(models["gpt2"], tmp_path / f"t{i}", deltas)
        tuned = dict(load(fts[f"t{i}"]).named_parameters())
        flat[f"t{i}"] = torch.cat([(tuned[n] - p).detach().reshape(-1).double() for n, p in base.named_parameters()])
    with registry("merging"):
        out = analyze(fts, base=models["gpt2"], metrics=["merging.task_vectors"]).get("merging.task_vectors")
    assert out.status == "ok", out.reason
    for a in flat:
        assert out.value(f"total_norm/{a}") == pytest.approx(float(flat[a].norm()), rel=1e-12)
    for a, b in (("t0", "t1"), ("t0", "t2"), ("t1", "t2")):
        expected = float(flat[a] @ flat[b]) / float(flat[a].norm() * flat[b].norm())
        assert out.value(f"cosine/{a}/{b}") == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert out.declared_bytes == 8 * 999
    check_declared_cost(out)


def test_without_a_base_it_is_skipped_with_the_fix(models, tmp_path) -> None:
    other = tiny_model("gpt2", tmp_path / "other", seed=1)
    with registry("merging"):
        res = analyze({"a": models["gpt2"], "b": other}, metrics=["merging.task_vectors"])
    out = res.get("merging.task_vectors")
    assert out.status == "skipped" and "base=" in out.reason and "--base" in out.reason


def test_models_of_different_shapes_are_an_error(models, tmp_path) -> None:
    wide = tiny_model("gpt2", tmp_path / "wide", seed=1, d_model=48)
    with registry("merging"):
        out = analyze({"wide": wide}, base=models["gpt2"], metrics=["merging.task_vectors"]).get(
            "merging.task_vectors")
    assert out.status == "error" and "same base model" in out.reason
