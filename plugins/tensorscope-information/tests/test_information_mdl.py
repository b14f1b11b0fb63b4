"""information.mdl end to end: the data term against basic.loss, a uniform predictor, weight codes of
hand-set weights, the online code of a layer that holds the label, and the tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from information_toys import gaussian_chain, toy_adapter
from transformers import AutoModelForCausalLM

from tensorscope_core import RunConfig, analyze, builtin_corpus
from tensorscope_core.testing import check_declared_cost, check_declared_passes

METRIC = "information.mdl"
FAST = {"probe_max_iter": 10}


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_data_term_is_basic_loss_summed_in_bits_on_the_shared_forward(models, family):
    res = analyze(
        models[family],
        data=builtin_corpus()[:12],
        metrics=[METRIC, "basic.loss"],
        params={METRIC: FAST},
        config=RunConfig(batch_size=4, max_length=24),
    )
    result, loss = res.get(METRIC), res.get("basic.loss").values["loss"]
    assert result.ok, result.reason
    assert res.record.models[0].passes == {"forward": 3}  # one stage: the shared forward only
    assert result.values["data_bits"].n == loss.n
    assert result.value("data_bits") == pytest.approx(loss.value * loss.n / math.log(2), rel=1e-9)
    assert result.value("model_code_bits") == pytest.approx(
        result.value("weight_bits") + result.value("architecture_bits") + result.value("data_bits"), rel=1e-12
    )
    online, compression = result.value("online_bits"), result.value("compression")
    assert len(online) == 3 and result.values["online_bits"].axis == "resid"
    assert compression == pytest.approx([result.value("uniform_bits") / b for b in online], rel=1e-12)
    check_declared_cost(result)
    check_declared_passes(result)


def test_uniform_predictor_costs_n_log2_v(models):
    """A zero unembedding predicts uniformly: the data term is N log2 V exactly."""
    model = AutoModelForCausalLM.from_pretrained(models["llama"])
    with torch.no_grad():
        model.lm_head.weight.zero_()
    vocab = model.config.vocab_size
    ids = torch.randint(4, vocab, (8, 16), generator=torch.Generator().manual_seed(0))
    result = analyze(model, data=ids, metrics=[METRIC], params={METRIC: FAST}, config=RunConfig(batch_size=4)).get(
        METRIC
    )
    assert result.value("data_bits") == pytest.approx(8 * 15 * math.log2(vocab), rel=1e-6)


def _set_weights(model: torch.nn.Module, fill) -> int:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(fill(p))
    return sum(p.numel() for p in model.parameters())


def test_weight_code_of_gaussian_and_constant_weights():
    """Every tensor N(0, 0.02^2) with step sigma / 16: about 6.05 bits per weight; constant tensors: 0."""
    ids = torch.randint(4, 2048, (8, 16), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    model = gaussian_chain([0.5])
    _set_weights(model, lambda p: 0.02 * torch.randn(p.shape, generator=gen))
    params = {METRIC: {**FAST, "weight_step": 0.02 / 16}}
    result = analyze(model, data=ids, metrics=[METRIC], adapter=toy_adapter(), params=params).get(METRIC)
    closed = 0.5 * math.log2(2 * math.pi * math.e * 0.02**2) - math.log2(0.02 / 16)
    assert result.value("weight_bits_per_param") == pytest.approx(closed, abs=0.03)
    _set_weights(model, lambda p: torch.full_like(p, 0.7))
    result = analyze(model, data=ids, metrics=[METRIC], adapter=toy_adapter(), params={METRIC: FAST}).get(METRIC)
    assert result.value("weight_bits") == 0.0


def test_online_code_compresses_a_layer_that_holds_the_label():
    """The next token is the successor of the current one in a cycle of 8: resid 0 (the token's
    embedding) determines the label, so its online code is far below the uniform n log2 8."""
    starts = torch.randint(0, 8, (32,), generator=torch.Generator().manual_seed(2))
    ids = 4 + (starts[:, None] + torch.arange(33)) % 8
    result = analyze(
        gaussian_chain([0.5], vocab=16, d=16, positional=False),
        data=ids,
        metrics=[METRIC],
        adapter=toy_adapter(),
        params={METRIC: {"probe_max_iter": 30}},
        config=RunConfig(batch_size=16),
    ).get(METRIC)
    assert result.value("classes") == 8
    assert result.value("uniform_bits") == pytest.approx(result.value("tokens") * 3.0)
    assert result.value("compression")[0] > 5.0


def test_one_sequence_is_skipped(models):
    result = analyze(models["gpt2"], data=builtin_corpus()[:1], metrics=[METRIC]).get(METRIC)
    assert result.status == "skipped" and "at least 2 sequences" in result.reason


def test_report_section_draws_every_metric(models):
    from tensorscope_information.report import information_section

    corpus = builtin_corpus()
    res = analyze(
        models["gpt2"],
        data=corpus[:24],
        metrics=[METRIC, "information.mutual_information", "information.pid"],
        params={
            METRIC: FAST,
            "information.mutual_information": {"n_bootstrap": 5, "probe_max_iter": 5},
            "information.pid": {"k": 2, "target_classes": 2, "min_samples_per_cell": 2, "n_bootstrap": 3},
        },
        config=RunConfig(batch_size=8, max_length=24),
    )
    html = information_section(res)
    assert html is not None and html.count("<figure") == 4  # probe bands, between-layer bands, PID, MDL
    assert "CI band" in html
