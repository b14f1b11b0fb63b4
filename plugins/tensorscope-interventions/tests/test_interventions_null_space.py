"""interventions.null_space: the projection's algebra (P^2 = P, P^T = P, [3, 4] -> [0, 4]), the metric against
per-example gradients and a least-squares projection computed by hand, the Lanczos basis, skips, declared
passes and memory."""

from __future__ import annotations

import pytest
import torch
from tensorscope_interventions.projection import RowSpace, projection_stats
from transformers import AutoModelForCausalLM

from tensorscope_core import RunConfig, analyze
from tensorscope_core.testing import check_declared_cost, check_declared_passes, random_token_data

METRIC = "interventions.null_space"


def test_closed_form_three_four() -> None:
    """G_A = [[1, 0]], g = [3, 4]: P g = [0, 4], removed 9/25, cos = 4/5, g_A . P g = 0."""
    space = RowSpace.of(torch.tensor([[1.0, 0.0]]), [slice(0, 2)], 1e-10)
    g = torch.tensor([3.0, 4.0], dtype=torch.float64)
    projected = space.project(g)
    assert projected.tolist() == [0.0, 4.0]
    stats = projection_stats(space, g, projected)
    assert stats.removed_fraction == pytest.approx(9 / 25, abs=1e-15)
    assert stats.cosine == pytest.approx(4 / 5, abs=1e-15)
    assert stats.max_abs_dot == 0.0 and stats.rank == 1


def test_projector_is_idempotent_and_symmetric_and_matches_the_explicit_one() -> None:
    """On random vectors: P(P x) = P x, <P x, y> = <x, P y>, against the float64 P x P projector
    I - G^T pinv(G G^T) G; a duplicated row does not raise the rank."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 40, generator=gen)
    rows = torch.cat([rows, rows[:1] * 2.0])  # linearly dependent: rank 5
    space = RowSpace.of(rows, [slice(0, 17), slice(17, 40)], 1e-10)
    assert space.rank == 5
    x, y = torch.randn(40, generator=gen, dtype=torch.float64), torch.randn(40, generator=gen, dtype=torch.float64)
    px, py = space.project(x), space.project(y)
    assert space.project(px) == pytest.approx(px, abs=1e-12)
    assert float(px @ y) == pytest.approx(float(x @ py), abs=1e-12)
    g64 = rows.double()
    explicit = torch.eye(40, dtype=torch.float64) - g64.T @ torch.linalg.pinv(g64 @ g64.T) @ g64
    assert px == pytest.approx(explicit @ x, abs=1e-12)
    assert (g64 @ px).abs().max() < 1e-12


@pytest.fixture(scope="module")
def tasks() -> dict[str, torch.Tensor]:
    return {"a": random_token_data(64, n=5, length=8, seed=1), "b": random_token_data(64, n=4, length=8, seed=2)}


def test_gpt2_matches_per_example_gradients_and_least_squares_by_hand(models, tasks) -> None:
    """Independent reference: per-example gradients of each task-A example's mean token loss and task B's
    loss gradient by autograd on an independently loaded float64 model, the row-space component by
    ``torch.linalg.lstsq`` (no Gram, no eigendecomposition)."""
    res = analyze(models["gpt2"], data=tasks, metrics=[METRIC], config=RunConfig(batch_size=3, dtype="float64"))
    out = res.get(METRIC)
    assert out.ok, out.reason
    model = AutoModelForCausalLM.from_pretrained(models["gpt2"]).double()
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def grad_of(ids: torch.Tensor) -> torch.Tensor:
        loss = model(ids, labels=ids).loss
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    G = torch.stack([grad_of(row[None]) for row in tasks["a"]])
    g = grad_of(tasks["b"])
    component = G.T @ torch.linalg.lstsq(G.T, g[:, None]).solution[:, 0]
    projected = g - component
    assert out.value("removed_fraction") == pytest.approx(float(component.square().sum() / g.square().sum()), rel=1e-6)
    assert out.value("cosine") == pytest.approx(float(g @ projected / (g.norm() * projected.norm())), rel=1e-6)
    assert out.value("max_abs_dot_relative") < 1e-10
    assert out.value("rank") == 5 and out.value("n_protected") == 5
    assert res.tensor(METRIC, "projected").double() == pytest.approx(projected, abs=1e-6)

    block0 = torch.cat(
        [
            torch.ones(p.numel(), dtype=torch.bool) * n.startswith("transformer.h.0.")
            for n, p in zip(names, params, strict=True)
        ]
    )
    G0, g0 = G[:, block0], g[block0]
    component0 = G0.T @ torch.linalg.lstsq(G0.T, g0[:, None]).solution[:, 0]
    assert out.value("removed_fraction_by_layer")[0] == pytest.approx(
        float(component0.square().sum() / g0.square().sum()), rel=1e-6
    )
    check_declared_passes(out)
    check_declared_cost(out)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_tiny_models_run_with_declared_memory(models, tasks, family) -> None:
    res = analyze(
        models[family],
        data=tasks,
        metrics=[METRIC],
        config=RunConfig(batch_size=3),
        params={METRIC: {"max_protected": 4, "saved": "layer"}},
    )
    out = res.get(METRIC)
    assert out.ok, out.reason
    assert out.value("n_protected") == 4
    assert out.value("max_abs_dot_relative") < 1e-5
    assert max(out.value("max_abs_dot_by_layer")) < 1e-5 * max(1.0, out.value("target_grad_norm")) ** 2
    check_declared_cost(out)
    check_declared_passes(out)
    model = res.record.models[0]
    assert model.passes.get("per_example_backward") == model.model_calls.get("artifact:per_example_grads")


def test_lanczos_basis_removes_the_eigenvector_span(models, tasks) -> None:
    """With the eigenvectors of fisher.lanczos (orthonormal), the removed fraction is |V^T g|^2 / |g|^2."""
    lanczos = {"k": 3, "max_iter": 8, "max_examples": 3, "keep_vectors": True}
    res = analyze(
        models["gpt2"],
        data=tasks,
        metrics=[METRIC],
        config=RunConfig(batch_size=3, dtype="float64"),
        params={METRIC: {"basis": "fisher.lanczos"}, "fisher.lanczos": lanczos},
    )
    out = res.get(METRIC)
    assert out.ok, out.reason
    V = res.tensor("fisher.lanczos", "eigenvectors").double()
    g = res.tensor(METRIC, "projected").double()  # P g: orthogonal to every eigenvector
    assert (V.T @ g).abs().max() < 1e-6
    assert out.value("rank") == 3
    without = analyze(
        models["gpt2"],
        data=tasks,
        metrics=[METRIC],
        config=RunConfig(batch_size=3),
        params={METRIC: {"basis": "fisher.lanczos"}, "fisher.lanczos": {**lanczos, "keep_vectors": False}},
    )
    skipped = without.get(METRIC)
    assert skipped.status == "skipped" and "keep_vectors" in skipped.reason


def test_one_task_is_skipped_and_bad_parameters_refused(models) -> None:
    res = analyze(models["gpt2"], data=random_token_data(64, n=4, length=6), metrics=[METRIC])
    out = res.get(METRIC)
    assert out.status == "skipped" and "2 named tasks" in out.reason
    from tensorscope_core.plugin_api import BadParameterError

    for bad in ({"rank_rtol": 0.0}, {"basis": "svd"}, {"max_protected": 0}):
        with pytest.raises(BadParameterError):
            analyze(models["gpt2"], metrics=[METRIC], params={METRIC: bad})
