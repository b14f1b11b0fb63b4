"""fisher.natural_gradient against a dense float64 solve of (A ⊗ G + λI) d = vec(∇W) in column-major vec order
(§8 item 1), in both damping modes, and its sharing of the kfac_stats pass and the run's gradient."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tensorscope_core import RunConfig, analyze
from tensorscope_core.plugin_api import BadParameterError
from tensorscope_core.testing import check_declared_cost, check_declared_passes, check_roundtrip, random_token_data

CONFIG = RunConfig(batch_size=4, max_length=32, dtype="float64")
NAMES = {"gpt2": "transformer.h.1.mlp.c_proj", "llama": "model.layers.0.self_attn.k_proj"}  # Conv1D+bias, Linear


@pytest.fixture(scope="module")
def model64(models):
    return {
        f: AutoModelForCausalLM.from_pretrained(models[f], attn_implementation="eager", dtype=torch.float64)
        for f in ("gpt2", "llama")
    }


def run(model, data, metrics=("fisher.natural_gradient",), **params):
    res = analyze(
        model,
        data=data,
        metrics=list(metrics),
        params={"fisher.natural_gradient": params, "fisher.kfac": {"modules": params.get("modules", ("*",))}},
        config=CONFIG,
    )
    return res, res.get("fisher.natural_gradient")


def loss_grad(model, name, rows):
    """∇ of the run's mean token loss w.r.t. [W | b] as [out, in(+1)], by hand (one backward, unpadded rows)."""
    module = dict(model.named_modules())[name]
    model.zero_grad()
    ids = torch.stack(rows)
    logits = model(ids).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    weight = module.weight.grad.T if type(module).__name__ == "Conv1D" else module.weight.grad
    return weight if module.bias is None else torch.cat([weight, module.bias.grad[:, None]], dim=1)


def direction_of(res, model, name):
    module = dict(model.named_modules())[name]
    weight = res.tensor("fisher.natural_gradient", f"direction/{name}.weight")
    weight = weight.T if type(module).__name__ == "Conv1D" else weight
    if module.bias is None:
        return weight
    return torch.cat([weight, res.tensor("fisher.natural_gradient", f"direction/{name}.bias")[:, None]], dim=1)


def vec(x):
    return x.T.reshape(-1)  # column-major


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", ["eigenvalue", "factored"])
def test_direction_is_the_dense_damped_solve(family, mode, model64):
    """d = (A ⊗ G + λI)⁻¹ vec(∇W) (eigenvalue) or ((A + π√λ I) ⊗ (G + √λ/π I))⁻¹ vec(∇W) (factored), the
    Kronecker product built densely in float64 with fisher.kfac's factors from the same run."""
    model, name, damping = model64[family], NAMES[family], 1e-2
    rows = list(random_token_data(300, n=8, length=10, seed=2))
    res, result = run(
        model,
        rows,
        ("fisher.natural_gradient", "fisher.kfac"),
        modules=(name,),
        damping=damping,
        damping_mode=mode,
        keep_direction=True,
    )
    a, g = res.tensor("fisher.kfac", f"A/{name}"), res.tensor("fisher.kfac", f"G/{name}")
    grad = loss_grad(model, name, rows)
    eye_a, eye_g = torch.eye(a.shape[0], dtype=torch.float64), torch.eye(g.shape[0], dtype=torch.float64)
    if mode == "eigenvalue":
        dense = torch.kron(a, g) + damping * torch.eye(a.shape[0] * g.shape[0], dtype=torch.float64)
    else:
        pi = ((a.trace() / a.shape[0]) / (g.trace() / g.shape[0])).sqrt()
        dense = torch.kron(a + pi * damping**0.5 * eye_a, g + damping**0.5 / pi * eye_g)
        assert result.values["modules"].rows[0][-1] == pytest.approx(float(pi), rel=1e-12)
    want = torch.linalg.solve(dense, vec(grad))
    got = vec(direction_of(res, model, name))
    assert float((got - want).norm() / want.norm()) < 1e-8
    cosine = float(want @ vec(grad) / (want.norm() * grad.norm()))
    assert result.value("cosine_overall") == pytest.approx(cosine, rel=1e-8)
    assert result.value("grad_norm") == pytest.approx(float(grad.norm()), rel=1e-8)
    assert result.value("direction_norm") == pytest.approx(float(want.norm()), rel=1e-8)
    assert 0 < result.value("cosine_overall") <= 1


def test_shares_the_kfac_pass_and_the_shared_gradient(models, tmp_path):
    """With fisher.kfac in the run: one kfac_stats backward per micro-batch for both, no pass of its own,
    the gradient from the shared backward; cost declared truthfully; tiny GPT-2, LLaMA-GQA and BERT."""
    data = random_token_data(300, n=8, length=12, seed=1)
    for family in ("gpt2", "llama", "bert"):
        res = analyze(
            models[family],
            data=data,
            metrics=["fisher.natural_gradient", "fisher.kfac"],
            config=RunConfig(batch_size=4, max_length=32),
        )
        result = res.get("fisher.natural_gradient")
        assert result.ok, result.reason
        check_declared_cost(result)
        check_declared_passes(result)
        assert result.passes_declared == {}
        record = res.record.models[0]
        assert record.model_calls.get("artifact:fisher.kfac_stats") == 2  # two batches, shared by both metrics
        assert result.value("n_examples") == res.get("fisher.kfac").value("n_examples")
        assert 0 < result.value("cosine_overall") <= 1
        assert len(result.values["modules"].rows) == len(res.get("fisher.kfac").values["capacity"].rows)
    check_roundtrip(res, tmp_path / "bert")


def test_diagonal_factors_use_the_identity_basis(model64):
    """diagonal_over=0: every factor a diagonal; d = ∇W / (g_i a_j + λ) entrywise. fisher.kfac asks for full
    factors in the same run, so the pass serves full ones and this metric keeps their diagonals."""
    model, name = model64["llama"], NAMES["llama"]
    rows = list(random_token_data(300, n=4, length=8, seed=5))
    res, result = run(
        model, rows, ("fisher.natural_gradient", "fisher.kfac"), modules=(name,), diagonal_over=0, keep_direction=True
    )
    a, g = (res.tensor("fisher.kfac", f"{f}/{name}").diagonal() for f in ("A", "G"))
    want = loss_grad(model, name, rows) / (g[:, None] * a[None, :] + 1e-3)
    torch.testing.assert_close(direction_of(res, model, name), want, rtol=1e-9, atol=0)


def test_bad_damping_is_refused(models):
    with pytest.raises(BadParameterError):
        analyze(
            models["gpt2"],
            data=random_token_data(300, n=4, length=8),
            metrics=["fisher.natural_gradient"],
            params={"fisher.natural_gradient": {"damping": 0.0}},
        )
