"""gradients.pathology on deep tiny models with a planted vanishing block, exploding block, dead units."""

from __future__ import annotations

import pytest
from gradients_reference import modified_copy

from tensorscope_core.testing import check_declared_cost, run_metric, tiny_model

METRIC = "gradients.pathology"
DEEP = 8


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """Tiny GPT-2 and LLaMA with 8 blocks."""
    root = tmp_path_factory.mktemp("deep")
    return {family: tiny_model(family, root / family, seed=0, n_layers=DEEP) for family in ("gpt2", "llama")}


def flagged(result, field: str) -> list[int]:
    return [i for i, v in enumerate(result.value(field)) if v == 1.0]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_healthy_model_is_not_flagged(family, deep, texts):
    result = run_metric(METRIC, deep[family], texts)
    assert flagged(result, "vanishing") == [] and flagged(result, "exploding") == []
    assert result.value("n_dead_units") == 0
    assert result.values["diagnosis"].text.startswith("no gradient pathology found")
    rel = result.value("relative_norm")
    assert len(rel) == DEEP and sorted(rel)[DEEP // 2 - 1] <= 1.0 <= sorted(rel)[DEEP // 2]  # the median is 1
    check_declared_cost(result)


def test_planted_vanishing_block_is_flagged_exactly(deep, texts, tmp_path):
    """Every parameter of LLaMA block 3 times 1e-3: its gradients shrink by ~1e-6 (weights and
    the activations through them), the residual stream carries the others unchanged."""
    def edit(model):
        for p in model.model.layers[3].parameters():
            p.mul_(1e-3)

    result = run_metric(METRIC, modified_copy(deep["llama"], tmp_path / "m", edit), texts)
    assert flagged(result, "vanishing") == [3]
    assert flagged(result, "exploding") == []
    assert result.value("n_vanishing") == 1
    assert result.values["diagnosis"].text.startswith(
        "1 layer has vanishing gradients (layer 3; below 0.01x the median layer")
    assert result.values["diagnosis"].text.endswith("check initialisation and normalisation")


def test_planted_exploding_block_is_flagged_exactly(deep, texts, tmp_path):
    """LLaMA block 5: attention input norm x1e4, output projection /1e4. The block's output is
    unchanged in scale but the output projection's gradient (attention output times upstream
    gradient) grows 1e4-fold."""
    def edit(model):
        block = model.model.layers[5]
        block.input_layernorm.weight.mul_(1e4)
        block.self_attn.o_proj.weight.div_(1e4)

    result = run_metric(METRIC, modified_copy(deep["llama"], tmp_path / "m", edit), texts)
    assert flagged(result, "exploding") == [5]
    assert flagged(result, "vanishing") == []
    assert "1 layer has exploding gradients (layer 5" in result.values["diagnosis"].text
    assert "clip gradients" in result.values["diagnosis"].text


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_dead_units_are_counted_exactly(family, models, texts, tmp_path):
    """MLP hidden units forced to exactly 0 on every token (LLaMA: zero gate and up rows;
    GPT-2: c_fc bias -1e4, GELU(-1e4) = 0) never pass gradient to their outgoing weights."""
    dead = [3, 7, 11]

    def edit(model):
        if family == "llama":
            mlp = model.model.layers[1].mlp
            mlp.gate_proj.weight[dead] = 0.0
            mlp.up_proj.weight[dead] = 0.0
        else:
            model.transformer.h[1].mlp.c_fc.bias[dead] = -1e4

    result = run_metric(METRIC, modified_copy(models[family], tmp_path / "m", edit), texts)
    assert result.value("dead_units") == [0.0, 3.0]
    d_mlp = 64 if family == "llama" else 128  # tiny configs: LLaMA 2 x d_model, GPT-2 4 x d_model
    assert result.value("dead_fraction") == [0.0, 3.0 / d_mlp]
    assert result.value("n_dead_units") == 3
    assert "3 dead MLP units (no gradient on any batch) in layer 1" in result.values["diagnosis"].text
    check_declared_cost(result)
