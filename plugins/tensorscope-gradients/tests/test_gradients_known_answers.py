"""Closed-form answers of metric-specs.md sections 9 and 10: TracIn, PCGrad, BH, the stores' bounds."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gradients_reference import pcgrad_reference
from tensorscope_gradients.maths import bh, pcgrad, robust_null, tracin
from tensorscope_gradients.tracin import CriticalParams, CriticalSamples, TracIn, TracInParams

from tensorscope_core import MetricResult, RunShape, ScalarValue, SeriesValue, TableValue
from tensorscope_core.example_store import CountSketch, GradientStore
from tensorscope_core.plugin_api import NotApplicable

SHAPE = RunShape(0, 0, 0, 0, (), 0)


def linear_grad(w: torch.Tensor, x: tuple[float, float], y: float) -> torch.Tensor:
    """Gradient of l = 1/2 (w . x - y)^2 by autograd."""
    w = w.clone().requires_grad_(True)
    loss = 0.5 * (w @ torch.tensor(x, dtype=torch.float64) - y) ** 2
    loss.backward()
    assert w.grad is not None
    return w.grad


def spec_gradients() -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.tensor([1.0, -1.0], dtype=torch.float64)
    return linear_grad(w, (1, 2), 0)[None], linear_grad(w, (2, 1), 3)[None]


def test_tracin_spec_example():
    """w=(1,-1), z=((1,2),0), z'=((2,1),3), eta=0.1, one checkpoint: TracIn 0.8, self-influence 0.5."""
    g_train, g_test = spec_gradients()
    influence, self_influence = tracin([g_train], [g_test], [0.1])
    assert float(influence[0, 0]) == pytest.approx(0.8, rel=1e-12)
    assert float(self_influence[0]) == pytest.approx(0.5, rel=1e-12)
    # linear in the learning rates: the same checkpoint twice at 0.05 each is the same sum
    influence2, _ = tracin([g_train, g_train], [g_test, g_test], [0.05, 0.05])
    assert float(influence2[0, 0]) == pytest.approx(0.8, rel=1e-12)


def _terms(dot: float, train_self: float, test_self: float) -> MetricResult:
    """A gradients.tracin_terms result as one checkpoint would report it."""
    return MetricResult(metric="gradients.tracin_terms", version="1", plugin="tensorscope-gradients", status="ok",
                        params={"train_task": "train", "test_task": "test"}, values={
                            "dots": TableValue(columns=["train_index", "test_index", "dot"], rows=[[0, 0, dot]]),
                            "train_self": SeriesValue(values=[train_self]),
                            "test_self": SeriesValue(values=[test_self]),
                            "examples": TableValue(columns=["split", "index", "loss", "n_targets", "text"],
                                                   rows=[["train", 0, 0.5, 1, "z"], ["test", 0, 2.0, 1, "z'"]]),
                            "n_train": ScalarValue(value=1), "n_test": ScalarValue(value=1),
                            "projection_error": ScalarValue(value=0.0),
                            "projection_error_bound": ScalarValue(value=0.0)})


def test_tracin_metric_on_the_spec_example():
    """The model-set metric itself, fed the spec example's per-checkpoint terms: 0.8 and 0.5;
    z is a proponent of z' (positive influence), so it heads z''s proponents."""
    g_train, g_test = spec_gradients()
    terms = _terms(float(g_train[0] @ g_test[0]), float(g_train[0] @ g_train[0]), float(g_test[0] @ g_test[0]))
    views = {"ckpt": SimpleNamespace(config=None, name="ckpt")}
    metric = TracIn(TracInParams(learning_rates=[0.1]), SHAPE)
    out = metric.compute_set(views, {"ckpt": {"gradients.tracin_terms": terms}})  # type: ignore[arg-type]
    assert out["influence"].value == pytest.approx(0.8, rel=1e-12)
    assert out["self_influence"].values == pytest.approx([0.5], rel=1e-12)
    assert out["top_proponents"].rows[0][:4] == [0, 0, 0, pytest.approx(0.8)]
    assert out["top_opponents"].rows == []
    assert out["checkpoints"].rows == [["ckpt", None, 0.1, "parameter"]]
    # default_learning_rate is used when nothing else gives one; without any, it does not apply and names the fix
    out = TracIn(TracInParams(default_learning_rate=0.1), SHAPE).compute_set(
        views, {"ckpt": {"gradients.tracin_terms": terms}})  # type: ignore[arg-type]
    assert out["influence"].value == pytest.approx(0.8, rel=1e-12)
    with pytest.raises(NotApplicable, match="no learning rate for checkpoint ckpt") as caught:
        TracIn(TracInParams(), SHAPE).compute_set(views, {"ckpt": {"gradients.tracin_terms": terms}})  # type: ignore[arg-type]
    assert "learning_rates=[...]" in caught.value.fix


def test_pcgrad_spec_example():
    """g1=(1,0), g2=(-1,1): cos -0.707107; projected (0.5,0.5) and (0,1); sum (0.5,1.5); g1^PC . g2 = 0."""
    grads = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    assert float(torch.cosine_similarity(grads[0], grads[1], dim=0)) == pytest.approx(-0.707107, abs=1e-6)
    for order in ([0, 1], [1, 0]):
        coef, hit = pcgrad(grads @ grads.T, order)
        projected = coef @ grads
        torch.testing.assert_close(projected, torch.tensor([[0.5, 0.5], [0.0, 1.0]], dtype=torch.float64))
        torch.testing.assert_close(projected.sum(dim=0), torch.tensor([0.5, 1.5], dtype=torch.float64))
        assert float(projected[0] @ grads[1]) == pytest.approx(0.0, abs=1e-15)
        assert hit.tolist() == [[False, True], [True, False]]


def test_pcgrad_matches_reference_loop_on_random_tasks():
    """Five random task gradients in a random order against the PCGrad_tf.py loop."""
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(5, 40, generator=gen, dtype=torch.float64)
    order = [3, 0, 4, 1, 2]
    coef, _ = pcgrad(grads @ grads.T, order)
    projected = coef @ grads
    np.testing.assert_allclose(projected.numpy(), pcgrad_reference(grads.numpy(), order), rtol=1e-12, atol=1e-12)


def test_bh_spec_example():
    """pingouin's docstring example (metric-specs section 10), through scipy."""
    q = bh([0.50, 0.003, 0.32, 0.054, 0.0003])
    np.testing.assert_allclose(q, [0.5, 0.0075, 0.4, 0.09, 0.0015], rtol=1e-12)
    assert (q < 0.05).tolist() == [False, True, False, False, True]
    assert np.isnan(bh([0.01, np.nan])[1])


def test_robust_null_is_median_and_scaled_mad():
    x = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    center, scale = robust_null(x)
    assert center == 3.0
    assert scale == pytest.approx(1.482602218505602 * 1.0)


@pytest.mark.parametrize("compression", ["int8", "int8_zlib"])
def test_compressed_dot_products_within_reported_bound(compression):
    """|g~.h~ - g.h| <= (e_g + e_h + e_g e_h) ||g|| ||h|| for every pair, with e the reported error."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(12, 1000, generator=gen) * torch.logspace(-3, 1, 1000)  # uneven magnitudes
    store = GradientStore(1000, compression)
    store.add(rows[:5])
    store.add(rows[5:])
    exact = rows.double() @ rows.double().T
    norms = rows.double().norm(dim=1)
    bound = store.cosine_error_bound() * norms[:, None] * norms[None, :]
    assert ((store.gram() - exact).abs() <= bound + 1e-12).all()
    assert 0 < float(store.errors.max()) < 0.05
    assert float(store.norms[3]) == pytest.approx(float(norms[3]), rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_uncompressed_dot_products_and_norms_are_float64_accurate(dtype):
    """Uncompressed stores of float32 / bfloat16 rows: dot products (float32 over 4096-entry
    pieces summed in float64, gathered in column blocks) and squared norms within 1e-7 of
    ||g|| ||h|| from a float64 product of the same stored values; float64 rows to rounding.
    Sizes that are not multiples of the piece or block width, several parts per store."""
    gen = torch.Generator().manual_seed(2)
    size = 3 * 4096 + 1234
    rows = (torch.randn(11, size, generator=gen) * torch.logspace(-3, 1, size)).to(dtype)
    rows[4] = -rows[1]  # an exactly opposite pair
    a, b = GradientStore(size), GradientStore(size)
    squares = a.add(rows[:3])
    a.add(rows[3:7])
    b.add(rows[7:])
    exact = rows.double() @ rows.double().T
    norms = rows.double().norm(dim=1)
    scale = norms[:, None] * norms[None, :]
    tol = 1e-14 if dtype == torch.float64 else 1e-7  # float64: the column blocks change the summation order
    for block_bytes in (256 * 2**20, 7 * 4096 * 8):  # one column block, or several
        gram = a.gram(block_bytes=block_bytes)
        cross = a.cross(b, block_bytes=block_bytes)
        assert ((gram - exact[:7, :7]).abs() <= tol * scale[:7, :7] + 1e-300).all()
        assert ((cross - exact[:7, 7:]).abs() <= tol * scale[:7, 7:] + 1e-300).all()
    assert float(gram[1, 4]) == pytest.approx(-float(norms[1]) ** 2, rel=1e-7)
    assert squares.tolist() == pytest.approx((norms[:3] ** 2).tolist(), rel=max(tol, 1e-12))
    assert a.norms.tolist() == pytest.approx(norms[:7].tolist(), rel=max(tol, 1e-12))


def test_count_sketch_is_unbiased_within_its_bound():
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(6, 5000, generator=gen, dtype=torch.float64)
    rows[1] = rows[0] + 0.1 * rows[1]  # one strongly aligned pair
    sketch = CountSketch(5000, 512, seed=0)
    projected = sketch(rows)
    torch.testing.assert_close(sketch(rows), projected)  # same seed, same sketch
    norms = rows.norm(dim=1)
    err = (projected @ projected.T - rows @ rows.T) / (norms[:, None] * norms[None, :])
    assert float(err.abs().max()) < 4 * sketch.std_bound


def test_critical_samples_statistics_on_a_planted_matrix():
    """20 training examples with influence ~ N(0, 0.01^2) on 5 test examples, one with -1 on all
    and one with 50x the typical self-influence: exactly those two are flagged."""
    gen = torch.Generator().manual_seed(0)
    dots = 0.01 * torch.randn(20, 5, generator=gen, dtype=torch.float64)
    dots[7] = -1.0
    selfs = 1.0 + 0.1 * torch.rand(20, generator=gen, dtype=torch.float64)
    selfs[12] = 50.0
    rows = [[i, j, float(dots[i, j])] for i in range(20) for j in range(5)]
    terms = _terms(0.0, 1.0, 1.0)
    terms.values["dots"] = TableValue(columns=["train_index", "test_index", "dot"], rows=rows)
    terms.values["train_self"] = SeriesValue(values=selfs.tolist())
    terms.values["test_self"] = SeriesValue(values=[1.0] * 5)
    terms.values["n_train"], terms.values["n_test"] = ScalarValue(value=20), ScalarValue(value=5)
    terms.values["examples"] = TableValue(columns=["split", "index", "loss", "n_targets", "text"],
                                          rows=[["train", i, 1.0, 1, f"t{i}"] for i in range(20)] +
                                          [["test", j, 1.0, 1, f"s{j}"] for j in range(5)])
    out = CriticalSamples(CriticalParams(learning_rates=[1.0]), SHAPE).compute_set(
        {"c": SimpleNamespace(config=None, name="c")}, {"c": {"gradients.tracin_terms": terms}})  # type: ignore[arg-type]
    assert [r[0] for r in out["negative_influence"].rows] == [7]
    assert out["negative_influence"].rows[0][2] == 1.0  # negative on every test example
    assert [r[0] for r in out["high_self_influence"].rows] == [12]
    assert out["diagnosis"].text.startswith("sample 7 has negative influence on the test set: check for corrupted")
    assert "sample 12 has unusually high self-influence" in out["diagnosis"].text
