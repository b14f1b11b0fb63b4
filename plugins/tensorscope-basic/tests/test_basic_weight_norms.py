"""basic.weight_norms on models whose every parameter is one constant: the norms are
c * sqrt(number of parameters), with the parameter counts written out from the configs."""

from __future__ import annotations

import math

import pytest
import torch
from basic_reference import ALL, blocks_of, load_hf

from tensorscope_core.testing import check_against_reference, check_declared_cost, run_metric

METRIC = "basic.weight_norms"
C = 0.375  # exact in float32, so the closed form holds to float64 rounding
D, V, P = 32, 340, 64  # d_model, vocab (tiny tokenizer), positions of the tiny configs


def _counts(family: str) -> tuple[int, int]:
    """(parameters per block, parameters outside the blocks), from the architecture by hand."""
    d = D
    if family == "gpt2":
        # ln_1, c_attn (d x 3d + 3d), c_proj, ln_2, c_fc (d x 4d + 4d), mlp c_proj (4d x d + d)
        block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)
        outside = V * d + P * d + 2 * d  # wte (= lm_head, tied: once), wpe, ln_f
    elif family == "llama":
        # two RMSNorms; q, o: d x d; k, v: d x d/2 (2 of 4 heads); gate, up, down: d x 2d
        block = 2 * d + 2 * d * d + 2 * d * (d // 2) + 3 * d * (2 * d)
        outside = V * d + V * d + d  # embed_tokens, lm_head (not tied), final norm
    else:
        # q, k, v, attention output (d x d + d each), 2 LayerNorms, intermediate d x 2d + 2d, output 2d x d + d
        block = 4 * (d * d + d) + 2 * (2 * d) + (2 * d * d + 2 * d) + (2 * d * d + d)
        # word (= decoder, tied: once), position, token type, embedding LayerNorm;
        # prediction head: transform dense + LayerNorm, decoder bias
        outside = V * d + P * d + 2 * d + 2 * d + (d * d + d) + 2 * d + V
    return block, outside


@pytest.mark.parametrize("family", ALL)
def test_constant_weights_closed_form(family, models):
    model = load_hf(models[family], family)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(C)
    block, outside = _counts(family)
    assert sum(p.numel() for p in model.parameters()) == 2 * block + outside  # the counts are right
    result = run_metric(METRIC, model)
    assert result.value("layer_norm") == pytest.approx([C * math.sqrt(block)] * 2, rel=1e-12)
    assert result.value("outside_norm") == pytest.approx(C * math.sqrt(outside), rel=1e-12)
    assert result.value("total_norm") == pytest.approx(C * math.sqrt(2 * block + outside), rel=1e-12)
    check_declared_cost(result)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_tied_embeddings_count_once(family, models):
    """GPT-2's lm_head and BERT's decoder share the input embedding: it counts once."""
    model = load_hf(models[family], family)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(C)
    _, outside = _counts(family)
    got = run_metric(METRIC, model).value("outside_norm")
    assert got == pytest.approx(C * math.sqrt(outside), rel=1e-12)
    assert got != pytest.approx(C * math.sqrt(outside + V * D), rel=1e-3)


@pytest.mark.parametrize("family", ALL)
def test_random_weights_equal_brute_force(family, models):
    """Saved and reloaded random weights: per block, the float64 norm of its parameters."""
    model = load_hf(models[family], family)
    result = run_metric(METRIC, models[family])
    blocks = blocks_of(model, family)
    want = [math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in b.parameters())) for b in blocks]
    all_sq = sum(float(p.detach().double().pow(2).sum()) for p in dict(model.named_parameters()).values())
    check_against_reference(result, "layer_norm", lambda: want, rtol=1e-9)
    assert result.value("total_norm") == pytest.approx(math.sqrt(all_sq), rel=1e-9)
    assert result.value("outside_norm") == pytest.approx(math.sqrt(all_sq - sum(w * w for w in want)), rel=1e-9)
