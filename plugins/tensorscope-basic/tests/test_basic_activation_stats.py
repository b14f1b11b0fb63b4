"""basic.activation_stats against a brute force from the model's hidden states and a
hand-built model whose dead MLP units are known."""

from __future__ import annotations

import pytest
import torch
from basic_reference import ALL, CAUSAL, blocks_of, load_hf, modified_copy, resid_norm_mlm, resid_norm_solo, tokenize

from tensorscope_core.plugin_api import BadParameterError
from tensorscope_core.testing import check_declared_cost, run_metric

METRIC = "basic.activation_stats"

# (layer, units) made dead in each family's MLP: exactly these, nothing else.
DEAD = {0: [], 1: [0, 5, 17, 31, 63]}


def _kill_units(family: str, units_by_layer: dict[int, list[int]]):
    """Force the MLP hidden units (the input of the MLP output projection) to exactly 0."""
    def edit(model: torch.nn.Module) -> None:
        for layer, units in units_by_layer.items():
            block = blocks_of(model, family)[layer]
            if family == "gpt2":
                block.mlp.c_fc.bias[units] = -1e4  # gelu_new(-1e4 + small) == 0 exactly
            elif family == "bert":
                block.intermediate.dense.bias[units] = -1e4  # exact erf GELU(-1e4) == 0
            else:  # LLaMA has no biases: a zero gate row gives silu(0) * up == 0
                block.mlp.gate_proj.weight[units] = 0.0
    return edit


@pytest.mark.parametrize("family", CAUSAL)
def test_resid_norm_equals_hidden_states_padded(family, models, texts, tokenizer):
    """Padded texts: the mean per-token norm over real tokens equals each text run alone
    (hidden_states[l] enters block l; the last entry is hooked before the final norm)."""
    result = run_metric(METRIC, models[family], texts)
    want = resid_norm_solo(load_hf(models[family], family), family, tokenize(tokenizer, texts))
    assert len(result.value("resid_norm")) == 3  # n_layers + 1
    torch.testing.assert_close(torch.tensor(result.value("resid_norm"), dtype=torch.float64),
                               torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=0)
    check_declared_cost(result)


@pytest.mark.parametrize("family", CAUSAL)
def test_resid_norm_unpadded(family, models, token_ids):
    result = run_metric(METRIC, models[family], token_ids)
    want = resid_norm_solo(load_hf(models[family], family), family, list(token_ids))
    torch.testing.assert_close(torch.tensor(result.value("resid_norm"), dtype=torch.float64),
                               torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=0)


def test_resid_norm_bert_masked_input(models, token_ids, tokenizer):
    """BERT sees the seeded masked-LM input of the shared forward."""
    result = run_metric(METRIC, models["bert"], token_ids)
    want = resid_norm_mlm(load_hf(models["bert"], "bert"), token_ids, tokenizer.mask_token_id)
    torch.testing.assert_close(torch.tensor(result.value("resid_norm"), dtype=torch.float64),
                               torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=0)
    check_declared_cost(result)


@pytest.mark.parametrize("family", ALL)
def test_dead_fraction_of_killed_units(family, models, texts, tmp_path):
    """Exactly k of d_mlp units killed in layer 1 -> dead_fraction == [0, k / d_mlp]."""
    folder = modified_copy(models[family], tmp_path / "dead", family, _kill_units(family, DEAD))
    d_mlp = 128 if family == "gpt2" else 64
    result = run_metric(METRIC, folder, texts)
    assert result.value("dead_fraction") == [0.0, len(DEAD[1]) / d_mlp]
    check_declared_cost(result)


def test_dead_fraction_untouched_model_is_zero(models, token_ids):
    assert run_metric(METRIC, models["gpt2"], token_ids).value("dead_fraction") == [0.0, 0.0]


@pytest.mark.parametrize("family", CAUSAL)
def test_dead_threshold(family, models, token_ids):
    """Every |h| is far below 1e6: with that threshold every unit counts as dead."""
    result = run_metric(METRIC, models[family], token_ids, params={"dead_threshold": 1e6})
    assert result.value("dead_fraction") == [1.0, 1.0]
    assert result.params == {"dead_threshold": 1e6}


@pytest.mark.parametrize("params", [{"dead_threshold": -0.1}, {"dead_treshold": 0.1}])
def test_bad_parameters_are_refused(params, models, token_ids):
    with pytest.raises(BadParameterError):
        run_metric(METRIC, models["gpt2"], token_ids, params=params)
