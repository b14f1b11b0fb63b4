"""landscape.sharpness: SAM sharpness and Hutchinson's trace on quadratics with known Hessians,
and on a model against an independent path (ordinary backward, weights edited in a copy)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from tensorscope_merging.sharpness import hutchinson_trace, sam_sharpness

from tensorscope_core import ModelSource, RunConfig, analyze
from tensorscope_core.core_artifacts import loss_targets
from tensorscope_core.models.load import load_model
from tensorscope_core.plugin_api import Batch, batch_loss
from tensorscope_core.plugins import get_registry
from tensorscope_core.testing import check_declared_cost, random_token_data

H = torch.diag(torch.tensor([5.0, 2.0, -1.0], dtype=torch.float64))
W = {"w": torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)}


def quadratic(hessian: torch.Tensor):
    return lambda p: 0.5 * p["w"] @ hessian @ p["w"]


def ball_maximum(hessian: np.ndarray, w: np.ndarray, rho: float) -> float:
    """max over ||e|| <= rho of q(w + e) - q(w), q = x^T H x / 2: the trust-region problem, solved by
    its secular equation (x = lambda (lambda I - H)^-1 w, lambda > lambda_max, ||x - w|| = rho)."""
    eye = np.eye(len(w))
    lam = brentq(lambda s: np.linalg.norm(np.linalg.solve(s * eye - hessian, hessian @ w)) - rho,
                 np.linalg.eigvalsh(hessian).max() + 1e-9, 1e9)
    x = lam * np.linalg.solve(lam * eye - hessian, w)
    return float(0.5 * x @ hessian @ x - 0.5 * w @ hessian @ w)


@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_first_order_sam_on_a_quadratic(rho):
    g = H @ W["w"]
    n = g.norm()
    want = float(rho * n + 0.5 * rho**2 * (g @ H @ g) / n**2)  # q(w + rho g/|g|) - q(w), exactly
    got = sam_sharpness(quadratic(H), W, rho, steps=1)
    assert got.loss == pytest.approx(3.0, abs=1e-15)
    assert got.first_order == pytest.approx(want, rel=1e-12)
    assert got.ascent == got.first_order


@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_ascent_reaches_the_maximum_over_the_ball(rho):
    best = ball_maximum(H.numpy(), W["w"].numpy(), rho)
    few = sam_sharpness(quadratic(H), W, rho, steps=3)
    many = sam_sharpness(quadratic(H), W, rho, steps=60)
    assert few.first_order <= few.ascent <= many.ascent <= best + 1e-12
    assert many.ascent == pytest.approx(best, rel=1e-9)


def test_zero_gradient_gives_zero_sharpness():
    got = sam_sharpness(quadratic(H), {"w": torch.zeros(3, dtype=torch.float64)}, 0.1, steps=4)
    assert (got.first_order, got.ascent) == (0.0, 0.0)


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    probes = hutchinson_trace(quadratic(H), W, 16, torch.Generator().manual_seed(0))
    assert torch.allclose(probes, torch.full((16,), 6.0, dtype=torch.float64), rtol=0, atol=1e-12)


def test_hutchinson_mean_and_variance_for_a_dense_hessian():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    hessian = a + a.T
    probes = hutchinson_trace(quadratic(hessian), {"w": torch.ones(4, dtype=torch.float64)}, 4000, gen)
    off = hessian - torch.diag(torch.diag(hessian))
    var = float(2 * off.square().sum())  # Var(z^T H z) = 2 sum_{i != j} H_ij^2 for Rademacher z
    assert abs(float(probes.mean()) - float(hessian.trace())) < 4 * (var / len(probes)) ** 0.5
    assert float(probes.var()) == pytest.approx(var, rel=0.1)


def test_model_sharpness_against_an_independent_path(models, tokenizer):
    ids = random_token_data(len(tokenizer), n=4, length=10, seed=5)
    rho = 0.05
    res = analyze(str(models["gpt2"]), data=ids, metrics=["landscape.sharpness", "basic.loss"],
                  params={"landscape.sharpness": {"rho": rho, "ascent_steps": 1, "hutchinson_probes": 2}},
                  config=RunConfig(batch_size=4, max_length=16))
    result = res.get("landscape.sharpness")
    assert result.ok, result.reason
    assert result.value("loss") == pytest.approx(res.get("basic.loss").value("loss"), rel=1e-6)
    check_declared_cost(result)
    # reference: the model's own backward for g, then theta + rho g/|g| written into a copy
    view = load_model(ModelSource(models["gpt2"]), get_registry().adapters)
    model = view.model
    batch = Batch(ids, torch.ones_like(ids), None, 0)
    targets = loss_targets(view, batch, 0)
    out = model(input_ids=ids, attention_mask=batch.attention_mask)
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    loss = torch.nn.functional.cross_entropy(logits, ids[:, 1:].reshape(-1))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    norm = torch.sqrt(sum(g.double().square().sum() for g in grads.values()))
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            p += (rho / norm * grads[n].double()).to(p.dtype)
        out = moved(input_ids=ids, attention_mask=batch.attention_mask)
        moved_loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                                       ids[:, 1:].reshape(-1))
    assert result.value("sharpness_first_order") == pytest.approx(float(moved_loss - loss.detach()), rel=1e-3, abs=1e-6)
    assert float(batch_loss(view, batch, targets)) == pytest.approx(float(loss), rel=1e-6)


def test_model_hvp_matches_finite_differences(models, tokenizer):
    """Hutchinson's z^T H z on a float64 model equals z^T (g(theta + h z) - g(theta - h z)) / 2h
    (GPT-2: LLaMA's RMSNorm and rotary compute in float32 even in a float64 model)."""
    ids = random_token_data(len(tokenizer), n=2, length=8, seed=6)
    view = load_model(ModelSource(models["gpt2"]), get_registry().adapters, dtype="float64")
    batch = Batch(ids, torch.ones_like(ids), None, 0)
    targets = loss_targets(view, batch, 0)
    theta = {n: p.detach() for n, p in view.model.named_parameters()}

    def loss_fn(params):
        return batch_loss(view, batch, targets, params)

    got = hutchinson_trace(loss_fn, theta, 1, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    z = {n: (torch.randint(0, 2, t.shape, generator=gen) * 2 - 1).to(t.dtype) for n, t in theta.items()}
    h = 1e-6  # |z| = sqrt(P): the step along z is h * sqrt(P)

    def grad_at(sign):
        leaves = {n: (t + sign * h * z[n]).requires_grad_(True) for n, t in theta.items()}
        return torch.autograd.grad(loss_fn(leaves), list(leaves.values()))

    plus, minus = grad_at(1), grad_at(-1)
    want = sum(float((z[n] * (gp - gm)).sum()) for n, gp, gm in zip(theta, plus, minus, strict=True)) / (2 * h)
    assert float(got[0]) == pytest.approx(want, rel=1e-6)
