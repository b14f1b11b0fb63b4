"""circuits.attention_entropy: spec section 4 closed forms and a brute-force reference."""

from __future__ import annotations

import math

import pytest
import torch
from tensorscope_circuits.patterns import entropy_sums
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from tensorscope_core import RunConfig, analyze
from tensorscope_core.testing import check_declared_cost, check_roundtrip, random_token_data, run_metric

METRIC = "circuits.attention_entropy"


def uniform_causal(seq: int) -> torch.Tensor:
    return torch.ones(seq, seq, dtype=torch.float64).tril() / torch.arange(1, seq + 1, dtype=torch.float64)[:, None]


def test_uniform_causal_rows_have_entropy_ln_q_plus_1():
    """Spec 4.4: uniform causal attention, H_q = ln(q+1), normalised 1 (q >= 1 counted)."""
    seq = 12
    sums = entropy_sums(uniform_causal(seq)[None, None], torch.ones(1, seq), causal=True)
    assert sums.count.item() == seq - 1
    assert sums.entropy.item() == pytest.approx(sum(math.log(q + 1) for q in range(1, seq)), rel=1e-12)
    assert sums.normalised.item() == pytest.approx(seq - 1, rel=1e-12)


def test_one_hot_rows_have_zero_entropy():
    seq = 9
    one_hot = torch.eye(seq)[torch.randint(0, seq, (seq,))].tril()  # some rows are all-zero after tril
    one_hot[torch.arange(seq), torch.arange(seq)] = (one_hot.sum(1) == 0).float()  # make each row one-hot
    sums = entropy_sums(one_hot[None, None], torch.ones(1, seq), causal=True)
    assert sums.entropy.item() == 0.0 and sums.normalised.item() == 0.0


def test_padding_and_encoder_normalisation():
    """Encoder row over T real keys (padding after): normalised by ln(T); padded queries do not count."""
    real, seq = 5, 8
    attn = torch.zeros(1, 1, seq, seq, dtype=torch.float64)
    attn[..., :real] = 1.0 / real
    mask = torch.zeros(1, seq)
    mask[0, :real] = 1
    sums = entropy_sums(attn, mask, causal=False)
    assert sums.count.item() == real
    assert sums.entropy.item() == pytest.approx(real * math.log(real), rel=1e-12)
    assert sums.normalised.item() == pytest.approx(real, rel=1e-12)


def zero_query_key(model) -> None:
    """Every attention score 0: uniform attention over the visible keys."""
    with torch.no_grad():
        if hasattr(model, "transformer"):  # GPT-2: q and k are the first 2d columns of c_attn
            d = model.config.n_embd
            for block in model.transformer.h:
                block.attn.c_attn.weight[:, :2 * d] = 0
                block.attn.c_attn.bias[:2 * d] = 0
        else:  # BERT
            for layer in model.bert.encoder.layer:
                for lin in (layer.attention.self.query, layer.attention.self.key):
                    lin.weight.zero_()
                    lin.bias.zero_()


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_uniform_attention_closed_form_on_padded_batches(family, models):
    """Zero Q/K weights give uniform attention: normalised entropy 1 everywhere; the entropy is the
    mean of ln(n_q): ln(q+1) over q >= 1 causally, ln(T_i) for the encoder (padding excluded)."""
    cls = AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM
    model = cls.from_pretrained(models[family], attn_implementation="eager")
    zero_query_key(model)
    lengths = [5, 9, 12, 16, 7, 3]
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(5, 300, (n,), generator=gen) for n in lengths]
    res = analyze(model, data=rows, metrics=[METRIC], config=RunConfig(batch_size=4))
    result = res.get(METRIC)
    logs = [math.log(q + 1) for n in lengths for q in range(1, n)] if family == "gpt2" else \
        [math.log(n) for n in lengths for _ in range(n)]
    for row in result.value("normalised"):
        assert row == pytest.approx([1.0] * 4, abs=1e-6)
    for row in result.value("entropy"):
        assert row == pytest.approx([sum(logs) / len(logs)] * 4, rel=1e-6)
    check_declared_cost(result)


def test_matches_brute_force_reference_and_round_trips(models, tmp_path):
    """Random LLaMA (GQA, rotary): per-row entropies from the model's own attentions, one unpadded
    sequence at a time, in Python loops (float64), token-weighted over sequences."""
    lengths = [6, 11, 16, 9, 14, 4, 12, 8]
    gen = torch.Generator().manual_seed(5)
    rows = [torch.randint(5, 300, (n,), generator=gen) for n in lengths]
    res = analyze(models["llama"], data=rows, metrics=[METRIC], config=RunConfig(batch_size=3))
    result = res.get(METRIC)
    model = AutoModelForCausalLM.from_pretrained(models["llama"], attn_implementation="eager")
    h_sum = torch.zeros(2, 4, dtype=torch.float64)
    n_sum = torch.zeros(2, 4, dtype=torch.float64)
    count = 0
    for ids in rows:
        with torch.no_grad():
            attentions = model(ids[None], output_attentions=True).attentions
        for layer, attn in enumerate(attentions):
            for head in range(4):
                for q in range(1, len(ids)):
                    p = attn[0, head, q, :q + 1].double()
                    h = -sum(float(x) * math.log(float(x)) for x in p if x > 0)
                    h_sum[layer, head] += h
                    n_sum[layer, head] += h / math.log(q + 1)
        count += len(ids) - 1
    assert torch.allclose(torch.tensor(result.value("entropy"), dtype=torch.float64), h_sum / count, rtol=1e-5)
    assert torch.allclose(torch.tensor(result.value("normalised"), dtype=torch.float64), n_sum / count, rtol=1e-5)
    low, high = (torch.tensor(result.value(f), dtype=torch.float64) for f in ("entropy_ci_low", "entropy_ci_high"))
    assert bool((low <= h_sum / count + 1e-9).all() and (h_sum / count <= high + 1e-9).all() and (low < high).all())
    check_declared_cost(result)
    check_roundtrip(res, tmp_path / "out")


def test_works_on_neox(neox_model):
    result = run_metric(METRIC, neox_model, random_token_data(300, n=6, length=10, seed=2))
    values = torch.tensor(result.value("normalised"))
    assert values.shape == (2, 4) and bool(((values > 0) & (values <= 1 + 1e-9)).all())


def test_tasks_pool_every_sequence(models):
    """Named tasks: the same sequences split over two tasks give the values of the untasked run."""
    ids = random_token_data(300, n=8, length=10, seed=4)
    pooled = run_metric(METRIC, models["gpt2"], ids)
    tasked = run_metric(METRIC, models["gpt2"], {"a": ids[:3], "b": ids[3:]})
    for field in ("entropy", "normalised"):
        assert torch.allclose(torch.tensor(tasked.value(field)), torch.tensor(pooled.value(field)), rtol=1e-12)
    check_declared_cost(tasked)
