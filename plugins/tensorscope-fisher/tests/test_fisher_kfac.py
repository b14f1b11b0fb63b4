"""fisher.kfac against known answers: §8 verification 1 (one example: A ⊗ G = vec∇W vec∇Wᵀ), the factors
against hand hooks in float64, the capacity against the eigenvalues of the explicitly built A ⊗ G."""

from __future__ import annotations

import math

import pytest
import torch
from fisher_kfac_reference import module_stats, weight_grad_row_major
from tensorscope_fisher.kronecker import factor_eigenvalues, kron_capacity
from transformers import AutoModelForCausalLM

from tensorscope_core import RunConfig, analyze
from tensorscope_core.testing import check_declared_cost, check_roundtrip, random_token_data

MODULES = {"gpt2": ("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"),  # Conv1D, bias
           "llama": ("model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj")}  # Linear, no bias


@pytest.fixture(scope="module")
def model64(models):
    """The tiny causal models in float64 (so the comparisons are exact up to round-off)."""
    return {f: AutoModelForCausalLM.from_pretrained(models[f], attn_implementation="eager", dtype=torch.float64)
            for f in ("gpt2", "llama")}


def kfac(model, data, batch_size=4, **params):
    res = analyze(model, data=data, metrics=["fisher.kfac"], params={"fisher.kfac": params},
                  config=RunConfig(batch_size=batch_size, max_length=32, dtype="float64"))
    return res, res.get("fisher.kfac")


def factors(res, name):
    return (res.tensor("fisher.kfac", f"A/{name}"), res.tensor("fisher.kfac", f"G/{name}"))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_single_example_kron_is_grad_outer_product(family, model64):
    """§8 verification 1: one example position, observed label -> A ⊗ G = vec(∇W) vec(∇W)ᵀ exactly
    (PyTorch's row-major flatten: G ⊗ A for Linear [out, in], A ⊗ G for Conv1D [in, out])."""
    model = model64[family]
    ids = torch.tensor([[7, 11]])  # one target: position 0 predicts token 11
    res, result = kfac(model, ids, labels="observed")
    assert result.value("n_examples") == 1
    for name in MODULES[family]:
        a, g = factors(res, name)
        v = weight_grad_row_major(model, name, ids[0], label=11)
        conv = type(dict(model.named_modules())[name]).__name__ == "Conv1D"
        kron = torch.kron(a, g) if conv else torch.kron(g, a)
        outer = torch.outer(v, v)
        assert outer.abs().max() > 0  # (one key: W_Q, W_K get no gradient at position 0, W_V does)
        assert torch.allclose(kron, outer, rtol=1e-9, atol=1e-12 * outer.abs().max())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_factors_match_hand_hooks_on_padded_data(family, model64):
    """A and G (observed labels) against hooks placed by hand, one unpadded sequence at a time.

    LLaMA's own padded forward differs from its unpadded one by ~1e-7 in float64 (transformers' rotary /
    mask path rounds through float32), hence its looser tolerance; GPT-2 agrees to round-off."""
    model = model64[family]
    rtol = 1e-10 if family == "gpt2" else 1e-6
    rows = [torch.arange(4, 4 + n) * 3 % 300 + 4 for n in (9, 4, 12, 6, 2, 10)]  # padded batches of 4
    res, result = kfac(model, rows, labels="observed")
    for name in MODULES[family]:
        want_a, want_g, n = module_stats(model, name, rows)
        got_a, got_g = factors(res, name)
        assert result.value("n_examples") == n
        assert torch.allclose(got_a, want_a, rtol=rtol, atol=rtol * want_a.abs().max())
        assert torch.allclose(got_g, want_g, rtol=rtol, atol=rtol * want_g.abs().max())


def test_capacity_matches_explicit_kronecker_eigenvalues(model64):
    """trace, logdet (damped), cond, eigmax, eigmin of A ⊗ G against eigh of the built product."""
    model = model64["llama"]
    name = "model.layers.0.self_attn.k_proj"  # A 32 x 32, G 16 x 16: A ⊗ G is 512 x 512
    res, result = kfac(model, random_token_data(300, n=8, length=12, seed=3), modules=(name,), damping=1e-3)
    a, g = factors(res, name)
    lam = torch.linalg.eigvalsh(torch.kron(a, g)).clamp_min(0)
    row = dict(zip(result.values["capacity"].columns, result.values["capacity"].rows[0], strict=True))
    assert row["module"] == name and (row["dim_A"], row["dim_G"]) == (32, 16)
    assert row["trace"] == pytest.approx(float(lam.sum()), rel=1e-10)
    assert row["logdet"] == pytest.approx(float(torch.log(lam + 1e-3).sum()), rel=1e-10)
    assert row["cond"] == pytest.approx(float((lam.max() + 1e-3) / (lam.min() + 1e-3)), rel=1e-8)
    assert row["eigmax"] == pytest.approx(float(lam.max()), rel=1e-10)
    assert result.value("trace") == pytest.approx([row["trace"]], rel=1e-12)  # one module in layer 0
    assert result.values["trace"].axis == "block" and result.values["trace"].labels == ["0"]


def test_undamped_logdet_is_the_factor_formula():
    """λ = 0: logdet(A ⊗ G) = dim G · logdet A + dim A · logdet G; singular -> -inf and cond inf."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 5, generator=gen, dtype=torch.float64), torch.randn(3, 3, generator=gen, dtype=torch.float64)
    a, g = x @ x.T + 0.1 * torch.eye(5, dtype=torch.float64), y @ y.T + 0.1 * torch.eye(3, dtype=torch.float64)
    cap = kron_capacity(factor_eigenvalues(a), factor_eigenvalues(g), damping=0.0)
    lam = torch.linalg.eigvalsh(torch.kron(a, g))
    assert cap["logdet"] == pytest.approx(3 * float(torch.logdet(a)) + 5 * float(torch.logdet(g)), rel=1e-12)
    assert cap["logdet"] == pytest.approx(float(lam.log().sum()), rel=1e-10)
    assert cap["cond"] == pytest.approx(float(lam.max() / lam.min()), rel=1e-8)
    assert cap["trace"] == pytest.approx(float(torch.trace(a) * torch.trace(g)), rel=1e-12)
    singular = kron_capacity(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 3.0]), damping=0.0)
    assert singular["logdet"] == -math.inf and singular["cond"] == math.inf and singular["eigmax"] == 6.0


def test_sampled_labels_give_a_vocabulary_score(model64):
    """True Fisher, one example: G is g_y g_yᵀ for the drawn label y, g_y = ∂ log p_y / ∂ s (all y checked)."""
    model = model64["gpt2"]
    name = "transformer.h.1.mlp.c_proj"
    ids = torch.tensor([[9, 21]])
    res, _ = kfac(model, ids, modules=(name,))
    _, g = factors(res, name)
    module = dict(model.named_modules())[name]
    kept = {}
    handle = module.register_forward_hook(lambda m, a, o: kept.setdefault("s", o))
    model(ids)
    handle.remove()
    s0 = kept["s"][0, 0].detach()

    def logp_of(s):  # rerun the forward with position 0's output replaced by s
        swap = module.register_forward_hook(lambda m, a, o: torch.cat([s[None, None], o[:, 1:]], dim=1))
        try:
            return torch.log_softmax(model(ids).logits[0, 0], dim=-1)
        finally:
            swap.remove()

    scores = torch.autograd.functional.jacobian(logp_of, s0)  # [V, d_out]
    errors = torch.stack([(torch.outer(s, s) - g).abs().max() for s in scores])
    assert float(errors.min()) < 1e-12 * float(g.abs().max())


def test_cost_roundtrip_and_bert(models, tmp_path):
    ids = random_token_data(300, n=8, length=12, seed=1)
    res, result = kfac(models["gpt2"], ids)
    check_declared_cost(result)
    check_roundtrip(res, tmp_path / "gpt2")
    assert len(result.values["capacity"].rows) == 8  # c_attn, c_proj, c_fc, mlp.c_proj in each of 2 blocks
    _, bert = kfac(models["bert"], ids)  # encoder: every real token is an example
    assert bert.ok and bert.value("n_examples") == 8 * 12
    check_declared_cost(bert)


def test_no_matching_module_is_skipped(models):
    result = analyze(models["llama"], data=random_token_data(300, n=4, length=8), metrics=["fisher.kfac"],
                     params={"fisher.kfac": {"modules": ["*.nothing"]}}).get("fisher.kfac")
    assert result.status == "skipped" and "modules=['*.nothing']" in result.reason and "q_proj" in result.reason


def test_frozen_model_is_a_clear_error(models):
    model = AutoModelForCausalLM.from_pretrained(models["gpt2"], attn_implementation="eager")
    model.requires_grad_(False)
    result = analyze(model, data=random_token_data(300, n=4, length=8), metrics=["fisher.kfac"]).get("fisher.kfac")
    assert result.status == "error" and "does not depend on trainable parameters" in result.reason
