"""interventions.steering: the exact logit shift alpha W_U v on a linear model, hand-placed hooks on GPT-2,
skips, bad parameters, declared passes and memory."""

from __future__ import annotations

import pytest
import torch
from interventions_toy import LinearLM, LinearLMAdapter
from transformers import AutoModelForCausalLM

from tensorscope_core import RunConfig, analyze
from tensorscope_core.plugin_api import BadParameterError
from tensorscope_core.testing import (
    check_declared_cost,
    check_declared_passes,
    check_roundtrip,
    random_token_data,
    temporary_plugin,
)

METRIC = "interventions.steering"
CONFIG = RunConfig(batch_size=3)


def _data(vocab: int) -> dict[str, torch.Tensor]:
    return {
        "plus": random_token_data(vocab, n=5, length=7, seed=1),
        "minus": random_token_data(vocab, n=4, length=7, seed=2),
    }


def _means(embed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean embedding over every position but the first (unpadded rows)."""
    return embed[ids[:, 1:]].reshape(-1, embed.shape[1]).mean(dim=0)


def test_linear_model_logit_shift_is_alpha_unembed_v_exactly() -> None:
    """Known answer: identity blocks and a linear unembedding, so adding alpha v at any position moves
    every logit by alpha W_U v: the logit difference a - b by alpha (W_U[a] - W_U[b]) . v, and the loss
    is the float64 cross-entropy of the shifted logits."""
    model, alpha, (a, b) = LinearLM(), 0.7, (5, 11)
    data = _data(24)
    with temporary_plugin("toy", adapters=[LinearLMAdapter()]):
        res = analyze(
            model,
            data=data,
            metrics=[METRIC],
            config=RunConfig(batch_size=3, dtype="float64"),
            params={METRIC: {"alpha": alpha, "token_ids": [a, b], "layers": [0, 2, 3]}},
        )
    out = res.get(METRIC)
    assert out.ok, out.reason
    embed, unembed = model.tok.weight.detach(), model.head.weight.detach()
    v = _means(embed, data["plus"]) - _means(embed, data["minus"])
    assert res.tensor(METRIC, "vectors").double() == pytest.approx(v.expand(3, -1).float().double(), abs=1e-6)
    assert out.value("vector_norm") == pytest.approx([float(v.norm())] * 3, rel=1e-12)
    shift = alpha * float((unembed[a] - unembed[b]) @ v)
    assert out.value("logit_diff_change") == pytest.approx([shift] * 3, rel=1e-12, abs=1e-13)

    minus = data["minus"]
    logits = embed[minus] @ unembed.T

    def loss(z: torch.Tensor) -> float:
        return float(torch.nn.functional.cross_entropy(z[:, :-1].reshape(-1, 24), minus[:, 1:].reshape(-1)))

    base, moved = loss(logits), loss(logits + alpha * (unembed @ v))
    assert out.value("loss_base") == pytest.approx(base, rel=1e-12)
    assert out.value("loss_change") == pytest.approx([moved - base] * 3, rel=1e-9, abs=1e-12)
    assert out.value("logit_diff_base") == pytest.approx(
        float((logits[:, :-1, a] - logits[:, :-1, b]).mean()), rel=1e-12
    )
    check_declared_passes(out)
    assert out.model_calls == (1 + 3) * 2  # the unsteered and three steered replays of minus's 2 batches


def test_gpt2_matches_hooks_placed_by_hand(models) -> None:
    """Independent reference: the means from ``output_hidden_states`` of an independently loaded model
    and the loss on x- with a pre-hook adding alpha v on block 1 by hand."""
    data, alpha = _data(64), 2.0
    res = analyze(
        models["gpt2"],
        data={k: v for k, v in data.items()},
        metrics=[METRIC],
        config=CONFIG,
        params={METRIC: {"alpha": alpha, "layers": [1]}},
    )
    out = res.get(METRIC)
    assert out.ok, out.reason
    model = AutoModelForCausalLM.from_pretrained(models["gpt2"]).eval()

    def mean_resid(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states[1]
        return hidden[:, 1:].double().reshape(-1, hidden.shape[-1]).mean(dim=0)

    v = mean_resid(data["plus"]) - mean_resid(data["minus"])
    assert res.tensor(METRIC, "vectors")[0].double() == pytest.approx(v, abs=1e-5)

    def loss_on_minus() -> float:
        with torch.no_grad():
            return float(model(data["minus"], labels=data["minus"]).loss)

    base = loss_on_minus()
    handle = model.transformer.h[1].register_forward_pre_hook(
        lambda module, args: (args[0] + alpha * v.float(), *args[1:])
    )
    moved = loss_on_minus()
    handle.remove()
    assert out.value("loss_base") == pytest.approx(base, abs=1e-5)
    assert out.value("loss_change")[0] == pytest.approx(moved - base, abs=1e-5)
    assert moved != base
    check_declared_cost(out)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_tiny_models_run_with_declared_passes_and_memory(models, family, tmp_path) -> None:
    data = {"plus": random_token_data(64, n=4, length=6, seed=3), "minus": random_token_data(64, n=5, length=9, seed=4)}
    res = analyze(models[family], data=data, metrics=[METRIC], config=CONFIG)
    out = res.get(METRIC)
    assert out.ok, out.reason
    check_declared_passes(out)
    check_declared_cost(out)
    n_layers = len(out.value("layers"))
    assert out.model_calls == (1 + n_layers) * 2
    assert (
        out.value("best_layer") == out.value("layers")[min(range(n_layers), key=out.value("loss_change").__getitem__)]
    )
    check_roundtrip(res, tmp_path / "out")


def test_one_task_is_skipped_with_the_reason(models) -> None:
    res = analyze(models["gpt2"], data=random_token_data(64, n=4, length=6), metrics=[METRIC], config=CONFIG)
    out = res.get(METRIC)
    assert out.status == "skipped" and "2 named tasks" in out.reason


def test_unknown_task_is_skipped_with_the_reason(models) -> None:
    res = analyze(models["gpt2"], data=_data(64), metrics=[METRIC], config=CONFIG, params={METRIC: {"negative": "x"}})
    out = res.get(METRIC)
    assert out.status == "skipped" and "'x'" in out.reason


def test_bad_parameters_are_typed_errors(models) -> None:
    with pytest.raises(BadParameterError):
        analyze(models["gpt2"], data=_data(64), metrics=[METRIC], params={METRIC: {"token_ids": [1]}})
    out = analyze(models["gpt2"], data=_data(64), metrics=[METRIC], params={METRIC: {"layers": [7]}}).get(METRIC)
    assert out.status == "error" and out.error_type == "BadParameterError" and "0..2" in out.reason
