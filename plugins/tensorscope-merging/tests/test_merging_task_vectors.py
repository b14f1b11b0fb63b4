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


def test_declared_state_is_one_task_vector_whatever_the_number_of_fine_tunes(models, finetunes, deltas, result,
                                                                            tmp_path) -> None:
    """The metric holds one materialised task vector (the other of a pair is read one parameter at a
    time), so the declaration (the parameters' bytes) holds for two fine-tunes and for three."""
    param_bytes = sum(p.numel() * p.element_size() for p in load(models["gpt2"]).parameters())
    assert result.declared_bytes == param_bytes
    check_declared_cost(result)
    c = finetune(models["gpt2"], tmp_path / "c", {FC1: -deltas["a"]})
    with registry("merging"):
        res = analyze({**finetunes, "c": c}, base=models["gpt2"], metrics=["merging.task_vectors"])
    out = res.get("merging.task_vectors")
    assert out.status == "ok", out.reason
    assert out.measured_bytes == out.declared_bytes == param_bytes
    check_declared_cost(out)
    assert out.value("cosine/a/c") == pytest.approx(-1.0, abs=1e-6)
    assert out.value("cosine/a/b") == result.value("cosine/a/b")  # the pairs are those of the two-task run


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
