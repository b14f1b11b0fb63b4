"""fisher.stein as a metric: padded data, the protocol, methods, costs, round trip and errors."""

from __future__ import annotations

import pytest
import torch
from fisher_stein_reference import brute_force_fisher
from transformers import AutoModelForCausalLM, AutoTokenizer

from tensorscope_core import RunConfig, analyze
from tensorscope_core.testing import check_declared_cost, check_roundtrip, run_metric

STEIN = "fisher.stein"
TEXTS = ["the cat sat on the mat", "a dog", "the bird flew over the old house today", "once upon a time"]


def _rows(folder) -> list[torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [torch.tensor(tokenizer(t, add_special_tokens=True)["input_ids"]) for t in TEXTS]


def _model(folder):
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").double().eval()


def _blocks(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


@pytest.fixture(scope="module")
def exact_run(models, tmp_path_factory):
    """Exact F at layer 1, each text's last real token, float64, 2 padded batches of 2."""
    res = analyze(models["gpt2"], data=TEXTS, metrics=[STEIN], params={STEIN: {"layers": [1]}},
                  config=RunConfig(batch_size=2, dtype="float64"))
    return res, res.get(STEIN)


def test_exact_on_padded_data_matches_brute_force(models, exact_run, tmp_path):
    res, result = exact_run
    assert result.ok, result.reason
    model = _model(models["gpt2"])
    want = torch.stack([brute_force_fisher(model, _blocks(model)[1], row, len(row) - 1)
                        for row in _rows(models["gpt2"])]).mean(dim=0)
    got = res.tensor(STEIN, "fisher/layer_1")
    assert float(torch.linalg.matrix_norm(got - want) / torch.linalg.matrix_norm(want)) <= 1e-6
    eigenvalues = torch.linalg.eigvalsh(want).flip(0)
    torch.testing.assert_close(torch.tensor(result.value("eigenvalues/layer_1"), dtype=torch.float64), eigenvalues,
                               rtol=1e-6, atol=1e-12)
    assert result.value("trace") == pytest.approx([float(torch.trace(want))], rel=1e-6)
    assert result.value("eigmax") == pytest.approx([float(eigenvalues[0])], rel=1e-6)
    vectors = res.tensor(STEIN, "eigenvectors/layer_1")
    assert vectors.shape == (32, 8)
    torch.testing.assert_close(want @ vectors, vectors * eigenvalues[:8], rtol=0, atol=1e-8)
    assert result.value("n_sites") == len(TEXTS)
    check_declared_cost(result)
    check_roundtrip(res, tmp_path / "saved")


def test_protocol_with_greedy_draws_matches_extended_brute_force(models):
    """num_samples draws at temperature -> 0 are the argmax token: F at each text extended by it."""
    result = analyze(models["llama"], data=TEXTS[:2], metrics=[STEIN],
                     params={STEIN: {"layers": [2], "num_samples": 2, "temperature": 1e-6}},
                     config=RunConfig(batch_size=2, dtype="float64"))
    model = _model(models["llama"])
    wants = []
    for row in _rows(models["llama"])[:2]:
        with torch.no_grad():
            greedy = model(input_ids=row[None]).logits[0, -1].argmax()
        extended = torch.cat([row, greedy[None]])
        wants.append(brute_force_fisher(model, model.model.norm, extended, len(row)))
    want = torch.stack(wants).mean(dim=0)
    got = result.tensor(STEIN, "fisher/layer_2")
    assert float(torch.linalg.matrix_norm(got - want) / torch.linalg.matrix_norm(want)) <= 1e-6
    assert result.get(STEIN).value("n_sites") == 4


def test_topk_and_eig_against_exact(models, exact_run):
    res, _ = exact_run
    exact = res.tensor(STEIN, "fisher/layer_1")
    config = {"batch_size": 2, "dtype": "float64", "max_length": 32}
    top = run_metric(STEIN, models["gpt2"], TEXTS, {"layers": [1], "method": "topk", "topk": 20}, **config)
    mass, bound = top.value("dropped_mass")[0], top.value("error_bound")[0]
    assert 0 < mass <= top.value("dropped_mass_max")[0] < 1
    eig = run_metric(STEIN, models["gpt2"], TEXTS, {"layers": [1], "method": "eig", "rank": 3, "tol": 1e-10},
                     **config)
    torch.testing.assert_close(torch.tensor(eig.value("eigenvalues/layer_1"), dtype=torch.float64),
                               torch.linalg.eigvalsh(exact).flip(0)[:3], rtol=1e-7, atol=0)
    assert max(eig.value("residual_norms/layer_1")) <= 1e-6
    assert eig.value("trace") == [None]  # needs the whole spectrum
    sampled = run_metric(STEIN, models["gpt2"], TEXTS, {"layers": [1], "method": "sampled", "draws": 16}, **config)
    assert sampled.value("n_sites") == 4 and sampled.value("trace")[0] > 0
    # the topk matrix itself: the exact one minus at most the bound (trace of the PSD gap)
    gap_trace = res.get(STEIN).value("trace")[0] - top.value("trace")[0]
    assert -1e-12 <= gap_trace <= bound


def test_default_layers_and_positions_all(models):
    result = run_metric(STEIN, models["gpt2"], TEXTS[:2], {"positions": "all", "method": "sampled", "draws": 4})
    trace = result.values["trace"]
    assert trace.labels == ["0", "1"] and trace.axis == "resid"  # 2 blocks: residuals 2 * {1,2,3} // 4
    lengths = [len(r) for r in _rows(models["gpt2"])[:2]]
    assert result.value("n_sites") == sum(lengths)


def test_encoder_skipped_and_bad_parameters(models):
    bert = analyze(models["bert"], data=TEXTS[:2], metrics=[STEIN]).get(STEIN)
    assert bert.status == "skipped" and "causal LM" in (bert.reason or "")
    out_of_range = analyze(models["gpt2"], data=TEXTS[:2], metrics=[STEIN], params={STEIN: {"layers": [7]}})
    failed = out_of_range.get(STEIN)
    assert failed.status == "error" and failed.error_type == "BadParameterError" and "0..2" in (failed.reason or "")
    far = analyze(models["gpt2"], data=TEXTS[:2], metrics=[STEIN], params={STEIN: {"positions": [40]}}).get(STEIN)
    assert far.status == "error" and "position 40 is out of range" in (far.reason or "")
    from tensorscope_core.plugin_api import BadParameterError

    with pytest.raises(BadParameterError):
        analyze(models["gpt2"], data=TEXTS[:2], metrics=[STEIN], params={STEIN: {"positions": []}})


def test_sliding_window_models_are_skipped_with_the_reason(tmp_path):
    """Mistral (config-wide window) and Gemma-3 (a window on some layers): the single-position attention
    cannot model a window, so the metric is skipped before it runs, naming the windowed layers."""
    from tensorscope_core import analyze
    from tensorscope_core.testing import random_token_data, tiny_model

    for family, layers in (("mistral", "[0, 1]"), ("gemma3", "[0]")):
        res = analyze(tiny_model(family, tmp_path / family), data=random_token_data(64, n=2, length=8),
                      metrics=["fisher.stein"])
        result = res.get("fisher.stein")
        assert result.status == "skipped" and f"sliding-window attention (layers {layers})" in result.reason
