"""circuits.attention_drift: identical models 0, the closed form for uniform -> one-hot heads,
a float64 reference from the models' own attentions, and the declared passes."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.spatial.distance import jensenshannon
from transformers import AutoModelForCausalLM

from tensorscope_core import RunConfig, analyze
from tensorscope_core.testing import check_declared_passes, random_token_data, tiny_model

IDS = random_token_data(64, n=4, length=8, seed=6)


def uniform_to_one_hot_bits(n: int) -> float:
    """JSD in bits between the uniform row over n keys and a one-hot row."""
    return 0.5 * (math.log2(2 * n / (n + 1)) + math.log2(2 / (n + 1)) / n + (n - 1) / n)


def _pattern_model(folder, one_hot: bool):
    """Every head attends uniformly (zero query/key weights), or, with ``one_hot``, only to
    position 0: the token embeddings are zero and position 0 alone carries a large feature,
    which the key weights map onto the query bias."""
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    d = model.config.n_embd
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
        model.transformer.wpe.weight.zero_()
        model.transformer.wpe.weight[0, 0] = 10.0
        for block in model.transformer.h:
            block.attn.c_attn.weight.zero_()
            block.attn.c_attn.bias.zero_()
            block.attn.c_proj.weight.zero_()  # the residual stream stays the embeddings
            block.attn.c_proj.bias.zero_()
            block.mlp.c_proj.weight.zero_()
            block.mlp.c_proj.bias.zero_()
            if one_hot:
                block.attn.c_attn.bias[:d] = 1.0  # every query is the ones vector
                block.attn.c_attn.weight[0, d : 2 * d] = 100.0  # key = 100 * LN(x)[0]: large at position 0 only
    return model


def test_identical_models_have_zero_drift(models):
    res = analyze(
        {"a": models["llama"], "b": models["llama"]},
        data=IDS[:, :6] % 60 + 4,
        metrics=["circuits.attention_drift"],
        config=RunConfig(batch_size=2),
    )
    result = res.get("circuits.attention_drift")
    assert result.ok, result.reason
    assert result.value("max_drift") == pytest.approx(0.0, abs=1e-12)
    check_declared_passes(result)
    assert result.passes_declared == {"replay_forward": 2 * 2}


def test_uniform_to_one_hot_closed_form(tmp_path):
    """Spec: a head whose pattern moves from uniform to one-hot over the q + 1 keys of query q;
    the mean over the counted queries q = 1 .. 7 of the closed form."""
    folder = tiny_model("gpt2", tmp_path / "gpt2", with_tokenizer=False)
    before, after = _pattern_model(folder, one_hot=False), _pattern_model(folder, one_hot=True)
    res = analyze(
        {"step-0": before, "step-1": after},
        data=IDS,
        metrics=["circuits.attention_drift"],
        config=RunConfig(batch_size=4),
    )
    result = res.get("circuits.attention_drift")
    want = sum(uniform_to_one_hot_bits(q + 1) for q in range(1, 8)) / 7
    grid = result.value("last")
    assert all(v == pytest.approx(want, rel=1e-6) for row in grid for v in row)


def test_against_the_models_attentions(models):
    """Float64 reference: scipy's jensenshannon (squared) on the rows of the models' own
    attentions, one unpadded sequence at a time, over queries with 2+ visible keys."""
    other = models["gpt2"].parent / "gpt2-other"
    if not other.exists():
        tiny_model("gpt2", other, seed=3)
    texts = ["the cat sat on the mat", "a dog ran to the river"]
    res = analyze(
        {"a": models["gpt2"], "b": other},
        data=texts,
        metrics=["circuits.attention_drift"],
        config=RunConfig(batch_size=2),
    )
    result = res.get("circuits.attention_drift")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["gpt2"])
    a = AutoModelForCausalLM.from_pretrained(models["gpt2"], attn_implementation="eager")
    b = AutoModelForCausalLM.from_pretrained(other, attn_implementation="eager")
    sums, count = torch.zeros(2, 4, dtype=torch.float64), 0
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            pa, pb = a(ids, output_attentions=True).attentions, b(ids, output_attentions=True).attentions
        for q in range(1, ids.shape[1]):
            for layer in range(2):
                for head in range(4):
                    sums[layer, head] += (
                        jensenshannon(
                            pa[layer][0, head, q, : q + 1].double().numpy(),
                            pb[layer][0, head, q, : q + 1].double().numpy(),
                            base=2,
                        )
                        ** 2
                    )
            count += 1
    got = torch.tensor(result.value("last"), dtype=torch.float64)
    assert torch.allclose(got, sums / count, rtol=1e-5, atol=1e-12) and float(got.min()) > 0


def test_one_model_is_skipped(models):
    result = analyze(models["bert"], data=["the cat"], metrics=["circuits.attention_drift"]).get(
        "circuits.attention_drift"
    )
    assert result.status == "skipped" and "pass at least 2 models" in result.reason


def test_masked_lm_pair_on_padded_text(models):
    """BERT (bidirectional, the core's masked input) on padded batches: identical models, drift 0."""
    res = analyze(
        {"a": models["bert"], "b": models["bert"]},
        data=["the cat sat on the mat", "a dog", "the sea"],
        metrics=["circuits.attention_drift"],
        config=RunConfig(batch_size=2),
    )
    result = res.get("circuits.attention_drift")
    assert result.ok, result.reason
    assert result.value("max_drift") == pytest.approx(0.0, abs=1e-12)
    check_declared_passes(result)
