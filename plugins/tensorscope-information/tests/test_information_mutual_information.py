"""information.mutual_information end to end: a hand-built Gaussian chain with known MI per block,
a label the first layer holds exactly, tasks, the tiny GPT-2 / LLaMA / BERT models, pass counts."""

from __future__ import annotations

import math

import pytest
import torch
from information_toys import gaussian_chain, gaussian_mi, toy_adapter

from tensorscope_core import RunConfig, analyze, builtin_corpus
from tensorscope_core.plugin_api import BadParameterError
from tensorscope_core.testing import check_declared_cost, check_declared_passes, check_roundtrip

METRIC = "information.mutual_information"
RHOS = [0.5, 0.75, 0.9]


@pytest.fixture(scope="module")
def chain_result():
    ids = torch.randint(4, 2048, (48, 64), generator=torch.Generator().manual_seed(1))
    res = analyze(
        gaussian_chain(RHOS),
        data=ids,
        metrics=[METRIC],
        adapter=toy_adapter(),
        params={METRIC: {"n_bootstrap": 30, "probe_max_iter": 10, "ksg_max_tokens": 1500}},
        config=RunConfig(batch_size=16, max_length=64),
    )
    return res


def test_gaussian_chain_known_answers(chain_result):
    """Block l maps resid l to rho_l resid l + noise: I = -1/2 ln(1 - rho^2) = 0.1438, 0.4133, 0.8304.
    Tolerance: 4 standard errors (rho / sqrt(n)) for the Gaussian MI; KSG on 1 500 tokens 0.08."""
    result = chain_result.get(METRIC)
    assert result.ok, result.reason
    n = result.value("tokens")
    assert n == 48 * 62  # every position but 0 and the last (no next token), all sequences
    assert result.values["gaussian"].axis == "block" and result.value("pca_dims") == 1
    for value, ksg, rho in zip(result.value("gaussian"), result.value("ksg"), RHOS, strict=True):
        assert value == pytest.approx(gaussian_mi(rho), abs=4 * rho / math.sqrt(n))
        assert ksg == pytest.approx(gaussian_mi(rho), abs=0.08)
    for field in ("gaussian", "ksg"):
        for low, value, high in zip(
            result.value(f"{field}_ci_low"), result.value(field), result.value(f"{field}_ci_high"), strict=True
        ):
            assert low < value < high
    assert "Ledoit-Wolf" in result.values["estimators"].text and "Kraskov" in result.values["estimators"].text
    check_declared_cost(result)


def test_probe_bound_reaches_ln_k_when_the_layer_holds_the_label():
    """Token t + 1 = the successor of token t in a cycle of k = 8 tokens: resid 0 (the embedding of
    token t) determines the next token, uniform over 8 values, so I(h_0; Y) = ln 8 (spec: Y = X -> ln k)."""
    k = 8
    starts = torch.randint(0, k, (40,), generator=torch.Generator().manual_seed(2))
    ids = 4 + (starts[:, None] + torch.arange(33)) % k
    res = analyze(
        gaussian_chain([0.5], vocab=16, d=16, positional=False),
        data=ids,
        metrics=[METRIC],
        adapter=toy_adapter(),
        params={METRIC: {"estimators": ["probe"], "probe_l2": 1e-4, "n_bootstrap": 20}},
        config=RunConfig(batch_size=20, max_length=33),
    )
    result = res.get(METRIC)
    assert result.value("entropy_next_token") == pytest.approx(math.log(k), abs=0.01)
    first = result.value("probe_next_token")[0]
    assert first == pytest.approx(math.log(k), abs=0.05)
    assert result.value("probe_next_token_ci_low")[0] <= first <= result.value("probe_next_token_ci_high")[0]


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_tiny_models_with_tasks_share_the_one_forward(models, family, tmp_path):
    corpus = builtin_corpus()
    res = analyze(
        models[family],
        data={"a": corpus[:8], "b": corpus[8:16]},
        metrics=[METRIC, "basic.loss"],
        params={METRIC: {"n_bootstrap": 10, "probe_max_iter": 10, "top_k": 8}},
        config=RunConfig(batch_size=4, max_length=24),
    )
    result = res.get(METRIC)
    assert result.ok, result.reason
    assert res.record.models[0].passes == {"forward": 4}  # 16 sequences / 4, shared with basic.loss
    check_declared_passes(result)
    check_declared_cost(result)
    assert len(result.value("probe_next_token")) == len(result.value("gaussian")) + 1 == 3  # resid vs block axes
    assert len(result.value("probe_task")) == 3
    assert 0.0 <= min(result.value("probe_task")) <= max(result.value("probe_task")) <= math.log(2) + 1e-9
    check_roundtrip(res, tmp_path / "out")


def test_too_few_sequences_is_skipped(models):
    result = analyze(models["gpt2"], data=builtin_corpus()[:3], metrics=[METRIC]).get(METRIC)
    assert result.status == "skipped" and "at least 4 sequences" in result.reason


def test_too_few_tokens_for_one_component_leaves_the_between_layer_estimates_out(models):
    res = analyze(
        models["gpt2"],
        data=torch.randint(4, 60, (4, 4)),
        metrics=[METRIC],
        params={METRIC: {"n_bootstrap": 0, "probe_max_iter": 5}},
    )
    result = res.get(METRIC)
    assert result.ok and "gaussian" not in result.values and "left out" in result.values["estimators"].text


def test_bad_parameter_is_refused_before_the_run(models):
    with pytest.raises(BadParameterError):
        analyze(models["gpt2"], metrics=[METRIC], params={METRIC: {"ksg_dims": 21}})
