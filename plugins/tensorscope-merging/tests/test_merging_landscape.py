"""landscape.surface_2d: the analytic surface of a quadratic, filter normalisation, f(0,0) = the model's loss."""

from __future__ import annotations

import pytest
import torch
from merging_models_reference import registry
from pydantic import ValidationError
from tensorscope_merging.landscape import (
    LossSurface2D,
    SurfaceParams,
    direction_cosine,
    gaussian_direction,
    normalize_direction,
    output_row_dims,
    roughness,
    surface,
)

from tensorscope_core import ModelSource, RunConfig, analyze, plan
from tensorscope_core.models.load import load_model
from tensorscope_core.plugins import get_registry
from tensorscope_core.testing import check_declared_cost, random_token_data, run_metric


def test_surface_of_a_quadratic_is_the_analytic_one():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    H = a @ a.T - 2 * torch.eye(5, dtype=torch.float64)
    theta = {"w": torch.randn(5, generator=gen, dtype=torch.float64)}
    delta = {"w": torch.randn(5, generator=gen, dtype=torch.float64)}
    eta = {"w": torch.randn(5, generator=gen, dtype=torch.float64)}
    coords = torch.linspace(-1, 1, 7, dtype=torch.float64)
    got = surface(lambda p: 0.5 * p["w"] @ H @ p["w"], theta, delta, eta, coords)
    for i, x in enumerate(coords):
        for j, y in enumerate(coords):
            w = theta["w"] + x * delta["w"] + y * eta["w"]
            assert got[i, j] == pytest.approx(float(0.5 * w @ H @ w), rel=1e-12, abs=1e-12)


def test_roughness_of_a_plane():
    # f = 3 alpha - 2 beta on a grid of spacing h: every alpha-step changes f by 3h, every beta-step by 2h
    coords = torch.linspace(-1, 1, 5, dtype=torch.float64)
    plane = 3 * coords[:, None] - 2 * coords[None, :]
    h = float(coords[1] - coords[0])
    assert roughness(plane) == pytest.approx((3 * h + 2 * h) / 2, rel=1e-12)
    assert roughness(torch.ones(4, 4)) == 0.0


def test_filter_normalisation_gives_theta_row_norms(models):
    view = load_model(ModelSource(models["gpt2"]), get_registry().adapters)
    theta = {n: p.detach() for n, p in view.model.named_parameters()}
    rows = output_row_dims(view.model)
    assert rows["transformer.h.0.attn.c_attn.weight"] == 1  # Conv1D stores [in, out]: outputs are columns
    assert rows["transformer.wte.weight"] == 0
    raw = gaussian_direction(theta, torch.Generator().manual_seed(123))
    d = normalize_direction(raw, theta, rows, "filter", "zero")
    for name, t in theta.items():
        if t.dim() <= 1:
            assert torch.count_nonzero(d[name]) == 0, name
            continue
        dim = rows[name]
        want = t.movedim(dim, 0).reshape(t.shape[dim], -1).norm(dim=1)
        got = d[name].movedim(dim, 0).reshape(t.shape[dim], -1).norm(dim=1)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    kept = normalize_direction(raw, theta, rows, "filter", "weights")
    assert torch.equal(kept["transformer.ln_f.weight"], theta["transformer.ln_f.weight"])
    plain = normalize_direction(raw, theta, rows, "none", "zero")
    assert torch.equal(plain["transformer.wte.weight"], raw["transformer.wte.weight"])


def test_direction_cosine():
    a = {"x": torch.tensor([1.0, 0.0]), "y": torch.tensor([0.0])}
    b = {"x": torch.tensor([1.0, 1.0]), "y": torch.tensor([0.0])}
    assert direction_cosine(a, b) == pytest.approx(2**-0.5)
    assert direction_cosine(a, a) == pytest.approx(1.0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_centre_is_the_models_loss(models, tokenizer, family):
    ids = random_token_data(len(tokenizer), n=8, length=10, seed=3)
    res = analyze(str(models[family]), data=ids, metrics=["landscape.surface_2d", "basic.loss"],
                  params={"landscape.surface_2d": {"grid": 3, "max_batches": None}},
                  config=RunConfig(batch_size=4, max_length=16))
    result = res.get("landscape.surface_2d")
    assert result.ok, result.reason
    assert result.value("center_loss") == pytest.approx(res.get("basic.loss").value("loss"), rel=1e-6)
    grid = res.tensor("landscape.surface_2d", "surface")
    assert grid.shape == (3, 3) and float(grid[1, 1]) == pytest.approx(result.value("center_loss"), rel=1e-12)
    assert result.value("loss_std") > 0  # the directions move the loss
    check_declared_cost(result)


def test_surface_is_seeded_and_model_unchanged(models, tokenizer):
    ids = random_token_data(len(tokenizer), n=4, length=8, seed=4)
    view = load_model(ModelSource(models["llama"]), get_registry().adapters)
    before = {n: p.detach().clone() for n, p in view.model.named_parameters()}
    first = run_metric("landscape.surface_2d", view.model, data=ids, params={"grid": 3})
    second = run_metric("landscape.surface_2d", view.model, data=ids, params={"grid": 3})
    assert first.value("loss_mean") == second.value("loss_mean")
    for n, p in view.model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_even_grid_is_refused():
    with pytest.raises(ValidationError, match="grid must be odd"):
        SurfaceParams(grid=10)


class RoundedSurface(LossSurface2D):
    """The surface with the asked directions rounded through bfloat16 and kept in the parameters' dtype:
    the exact computation the ``bf16_directions`` rung must equal."""

    name = "t.rounded_surface"

    def setup(self) -> None:
        super().setup()
        self.delta = {n: d.to(torch.bfloat16).to(d.dtype) for n, d in self.delta.items()}
        self.eta = {n: d.to(torch.bfloat16).to(d.dtype) for n, d in self.eta.items()}


def test_a_tight_budget_takes_bf16_directions_which_equal_the_rounded_directions_surface(models, tokenizer):
    ids = random_token_data(len(tokenizer), n=4, length=8, seed=4)
    params = {"grid": 3}
    with registry("merging", RoundedSurface):
        (roomy,) = plan(str(models["llama"]), ids, ["landscape.surface_2d"], params={"landscape.surface_2d": params},
                        config=RunConfig(batch_size=4, max_length=16, memory_budget="64GiB"))
        asked = roomy.declared_state["landscape.surface_2d"]
        budget = roomy.peak_bytes - asked // 5  # bf16 directions save 1/3 of the float32 state
        res = analyze(str(models["llama"]), data=ids, metrics=["landscape.surface_2d", "t.rounded_surface"],
                      params={"landscape.surface_2d": params, "t.rounded_surface": params},
                      config=RunConfig(batch_size=4, max_length=16, memory_budget=budget + roomy.peak_bytes))
        stepped = analyze(str(models["llama"]), data=ids, metrics=["landscape.surface_2d"],
                          params={"landscape.surface_2d": params},
                          config=RunConfig(batch_size=4, max_length=16, memory_budget=budget))
    out = stepped.get("landscape.surface_2d")
    assert out.ok, out.reason
    assert out.rung is not None and (out.rung.name, out.rung.chosen_by) == ("bf16_directions", "budget")
    assert torch.equal(stepped.tensor("landscape.surface_2d", "surface"), res.tensor("t.rounded_surface", "surface"))
    full = res.tensor("landscape.surface_2d", "surface")
    assert torch.allclose(stepped.tensor("landscape.surface_2d", "surface"), full, rtol=1e-2)
    view = load_model(ModelSource(models["llama"]), get_registry().adapters)
    n_params = sum(p.numel() for p in view.model.parameters())
    assert out.declared_bytes == 2 * 2 * n_params + 4 * n_params + 8 * 9 and asked == 3 * 4 * n_params + 8 * 9
    check_declared_cost(out)
    check_declared_cost(res.get("landscape.surface_2d"))


@pytest.mark.parametrize("one_dim", ["zero", "weights"])
def test_layer_and_global_normalisations_give_theta_norms(models, one_dim):
    """'layer': ||d_T|| = ||theta_T|| per matrix; 'global': ||d|| = ||theta|| over the matrices together
    (over all tensors too with one_dim='weights'); 1-D tensors as for 'filter'. rtol 1e-6."""
    view = load_model(ModelSource(models["llama"]), get_registry().adapters)
    theta = {n: p.detach() for n, p in view.model.named_parameters()}
    raw = gaussian_direction(theta, torch.Generator().manual_seed(123))
    rows = output_row_dims(view.model)

    def norm(tensors):
        return float(sum(t.double().square().sum() for t in tensors)) ** 0.5

    layer = normalize_direction(raw, theta, rows, "layer", one_dim)
    glob = normalize_direction(raw, theta, rows, "global", one_dim)
    matrices = [n for n, t in theta.items() if t.dim() > 1]
    for name in matrices:
        assert norm([layer[name]]) == pytest.approx(norm([theta[name]]), rel=1e-6), name
    assert norm([glob[n] for n in matrices]) == pytest.approx(norm([theta[n] for n in matrices]), rel=1e-6)
    ratios = {norm([glob[n]]) / norm([raw[n]]) for n in matrices}  # one scale for all matrices
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-6)
    for name in (n for n, t in theta.items() if t.dim() <= 1):
        want = torch.zeros_like(theta[name]) if one_dim == "zero" else theta[name]
        assert torch.equal(layer[name], want) and torch.equal(glob[name], want), name
    if one_dim == "weights":
        assert norm(glob.values()) == pytest.approx(norm(theta.values()), rel=1e-6)


@pytest.mark.parametrize(("normalization", "alpha2", "beta2"), [
    ("none", 9.0, 16.0),            # the raw directions
    ("filter", 1.0, 4.0 + 9.0),     # delta on row 0 of a only: that row's norm^2; eta on both rows of b
    ("layer", 5.0, 13.0),           # ||theta_a||^2, ||theta_b||^2
    ("global", 18.0, 18.0),         # ||theta_a||^2 + ||theta_b||^2, both directions
])
def test_quadratic_surface_under_each_normalisation(normalization, alpha2, beta2):
    """L(w) = 1/2 sum_T c_T ||w_T||^2 with delta (in a) and eta (in b) orthogonal to theta row by row:
    f(alpha, beta) = L(theta) + 1/2 (alpha^2 c_a ||delta||^2 + beta^2 c_b ||eta||^2), where the squared
    norms are what each normalisation makes them."""
    c = {"a": 2.0, "b": 0.5, "g": 3.0}
    theta = {"a": torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=torch.float64),
             "b": torch.tensor([[0.0, 2.0], [3.0, 0.0]], dtype=torch.float64),
             "g": torch.tensor([1.0, -1.0], dtype=torch.float64)}
    raw_delta = {"a": torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64),
                 "b": torch.zeros(2, 2, dtype=torch.float64), "g": torch.ones(2, dtype=torch.float64)}
    raw_eta = {"a": torch.zeros(2, 3, dtype=torch.float64),
               "b": torch.tensor([[4 * 0.6, 0.0], [0.0, 4 * 0.8]], dtype=torch.float64),
               "g": torch.ones(2, dtype=torch.float64)}
    rows = {"a": 0, "b": 0, "g": 0}
    delta = normalize_direction(raw_delta, theta, rows, normalization, "zero")
    eta = normalize_direction(raw_eta, theta, rows, normalization, "zero")

    def loss(p):
        return sum(0.5 * c[n] * p[n].square().sum() for n in p)

    coords = torch.linspace(-1, 1, 5, dtype=torch.float64)
    got = surface(loss, theta, delta, eta, coords)
    base = float(loss(theta))
    assert float(got[2, 2]) == pytest.approx(base, rel=1e-12)  # f(0, 0) = L(theta)
    for i, x in enumerate(coords.tolist()):
        for j, y in enumerate(coords.tolist()):
            want = base + 0.5 * (x * x * c["a"] * alpha2 + y * y * c["b"] * beta2)
            assert float(got[i, j]) == pytest.approx(want, rel=1e-9), (normalization, x, y)


@pytest.mark.parametrize("normalization", ["layer", "global"])
def test_centre_is_the_models_loss_under_other_normalisations(models, tokenizer, normalization):
    ids = random_token_data(len(tokenizer), n=8, length=10, seed=3)
    res = analyze(str(models["gpt2"]), data=ids, metrics=["landscape.surface_2d", "basic.loss"],
                  params={"landscape.surface_2d": {"grid": 3, "max_batches": None, "normalization": normalization}},
                  config=RunConfig(batch_size=4, max_length=16))
    result = res.get("landscape.surface_2d")
    assert result.ok, result.reason
    assert result.value("center_loss") == pytest.approx(res.get("basic.loss").value("loss"), rel=1e-6)
    assert result.value("loss_std") > 0
    check_declared_cost(result)


def test_filter_surface_is_unchanged_by_the_new_normalisations(models, tokenizer):
    """The default ('filter') draws and scales exactly as before: rows of theta, so the pinned value holds."""
    view = load_model(ModelSource(models["gpt2"]), get_registry().adapters)
    theta = {n: p.detach() for n, p in view.model.named_parameters()}
    raw = gaussian_direction(theta, torch.Generator().manual_seed(123))
    d = normalize_direction(raw, theta, output_row_dims(view.model), "filter", "zero")
    name = "transformer.h.1.mlp.c_proj.weight"  # Conv1D [in, out]: output rows are columns
    cols = raw[name] * (theta[name].norm(dim=0) / (raw[name].norm(dim=0) + 1e-10))[None, :]
    assert torch.equal(d[name], cols.contiguous())
