"""dynamics.representation_drift: identical models drift 0, and 1 - CKA against a float64
reference on hooked residual streams (and against geometry.cka_across, which shares its input)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tensorscope_core import RunConfig, analyze
from tensorscope_core.testing import check_roundtrip, random_token_data, tiny_model

IDS = random_token_data(64, n=4, length=6, seed=5)


def _resid(folder, ids):
    """resid entries (embeddings, each block's output) of one unpadded sequence set, by hand."""
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    outs = []
    handles = [
        b.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
        for b in model.transformer.h
    ]
    with torch.no_grad():
        first = model(ids, output_hidden_states=True).hidden_states[0]
    for h in handles:
        h.remove()
    return [x.reshape(-1, x.shape[-1]).double() for x in [first, *outs]]


def _linear_cka(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    return float((x.T @ y).square().sum() / ((x.T @ x).square().sum() * (y.T @ y).square().sum()).sqrt())


def test_identical_models_do_not_drift(bare_gpt2, tmp_path):
    res = analyze(
        {"step-1": bare_gpt2, "step-2": bare_gpt2, "step-3": bare_gpt2},
        data=IDS,
        metrics=["dynamics.representation_drift"],
        config=RunConfig(batch_size=4),
    )
    result = res.get("dynamics.representation_drift")
    assert result.ok, result.reason
    assert res.tensor("dynamics.representation_drift", "drift").abs().max() < 1e-12
    assert result.value("last") == pytest.approx([0.0] * 3, abs=1e-12)
    assert res.tensor("dynamics.representation_drift", "drift").shape == (2, 3)  # 2 consecutive pairs x resid
    check_roundtrip(res, tmp_path / "out")


def test_drift_against_float64_cka(tmp_path, bare_gpt2):
    """One batch of 4 x 6 tokens (all kept): minibatch CKA is full-data linear CKA."""
    later = tiny_model("gpt2", tmp_path / "later", seed=1, with_tokenizer=False)
    res = analyze(
        {"step-100": later, "step-10": bare_gpt2},
        data=IDS,
        metrics=["dynamics.representation_drift", "geometry.cka_across"],
        config=RunConfig(batch_size=4),
    )
    result = res.get("dynamics.representation_drift")
    assert result.value("pairs").rows[0][:2] == ["step-10", "step-100"]  # step order
    want = [1 - _linear_cka(a, b) for a, b in zip(_resid(bare_gpt2, IDS), _resid(later, IDS), strict=True)]
    assert result.value("last") == pytest.approx(want, rel=1e-6, abs=1e-9)
    same = res.tensor("geometry.cka_across", "same_layer_linear")
    assert result.value("last") == pytest.approx((1 - same[0, 1]).tolist(), abs=1e-12)
