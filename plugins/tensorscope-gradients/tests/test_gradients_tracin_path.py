"""gradients.tracin with interpolation_points: the weights on a least-squares model whose per-example
gradient is linear in theta (closed form and a brute-force sum), and the interior gradients against
backward passes at interpolated weights on GPT-2; LLaMA and BERT on a path of one model twice."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from gradients_reference import copy_tokenizer, example_grads, load_hf, tokenize
from tensorscope_gradients.maths import interpolation_weights
from tensorscope_gradients.tracin import TracIn, TracInParams

from tensorscope_core import (
    MetricResult,
    RunConfig,
    RunShape,
    ScalarValue,
    SeriesValue,
    TableValue,
    analyze,
    builtin_corpus,
)
from tensorscope_core.testing import check_declared_cost, check_declared_passes

TRACIN, TERMS = "gradients.tracin", "gradients.tracin_terms"
SHAPE = RunShape(1, 2, 2, 2, ("train", "test"), 0, ((1, 2, "train"), (1, 2, "test")))
Z, Z_TEST = (np.array([1.0, 2.0]), 0.0), (np.array([2.0, 1.0]), 3.0)  # metric-specs section 9


def grad(w: np.ndarray, example: tuple[np.ndarray, float]) -> np.ndarray:
    """Gradient of l = 1/2 (w . x - y)^2: (w . x - y) x, linear in w."""
    x, y = example
    return (w @ x - y) * x


def terms_at(w: np.ndarray) -> tuple[float, float, float]:
    g, h = grad(w, Z), grad(w, Z_TEST)
    return float(g @ h), float(g @ g), float(h @ h)


def spec_terms(w: np.ndarray) -> MetricResult:
    """gradients.tracin_terms of one checkpoint of the least-squares model."""
    dot, train_self, test_self = terms_at(w)
    return MetricResult(metric=TERMS, version="1", plugin="tensorscope-gradients", status="ok",
                        params={"train_task": "train", "test_task": "test"}, values={
                            "dots": TableValue(columns=["train_index", "test_index", "dot"], rows=[[0, 0, dot]]),
                            "train_self": SeriesValue(values=[train_self]),
                            "test_self": SeriesValue(values=[test_self]),
                            "examples": TableValue(columns=["split", "index", "loss", "n_targets", "text"],
                                                   rows=[["train", 0, 0.5, 1, "z"], ["test", 0, 2.0, 1, "z'"]]),
                            "n_train": ScalarValue(value=1), "n_test": ScalarValue(value=1),
                            "projection_error": ScalarValue(value=0.0),
                            "projection_error_bound": ScalarValue(value=0.0)})


class LeastSquaresPath:
    """The interior points' terms of the least-squares model (what ``PathGradients`` gives for a
    transformer): the metric's own loop moves it along the path and weighs its terms."""

    def __init__(self, first: Any, terms_params: Mapping[str, Any], seed: int) -> None:
        self.w = first.w.copy()
        self.train_task, self.test_task = terms_params["train_task"], terms_params["test_task"]

    @contextmanager
    def view(self) -> Iterator[None]:
        yield None

    def move_to(self, start: Any, end: Any, t: float) -> None:
        self.w = (1 - t) * start.w + t * end.w

    def terms(self, view: Any, data: Any, targets: Any) -> tuple[torch.Tensor, ...]:
        dot, train_self, test_self = terms_at(self.w)
        return (torch.tensor([[dot]], dtype=torch.float64), torch.tensor([train_self], dtype=torch.float64),
                torch.tensor([test_self], dtype=torch.float64))


class LeastSquaresTracIn(TracIn):
    path_gradients = LeastSquaresPath  # type: ignore[assignment]


def run(ws: list[np.ndarray], rates: list[float], n: int) -> dict[str, Any]:
    views = {f"ckpt-{i}": SimpleNamespace(config=None, name=f"ckpt-{i}", w=w) for i, w in enumerate(ws)}
    metric = LeastSquaresTracIn(TracInParams(learning_rates=rates, interpolation_points=n), SHAPE,
                                data={name: None for name in views})
    return metric.compute_set(views, {name: {TERMS: spec_terms(v.w)} for name, v in views.items()})  # type: ignore[arg-type]


W0, W1 = np.array([1.0, -1.0]), np.array([0.0, 1.0])


def brute_force(n: int, rates: tuple[float, float] = (0.1, 0.05)) -> np.ndarray:
    """sum over t = k/(n+1), k = 0..n of eta_0/(n+1) terms(w(t)), plus eta_1 terms(w_1), in a loop."""
    total = np.zeros(3)
    for k in range(n + 1):
        t = k / (n + 1)
        total += rates[0] / (n + 1) * np.array(terms_at((1 - t) * W0 + t * W1))
    return total + rates[1] * np.array(terms_at(W1))


def test_weights_reduce_to_tracincp():
    assert interpolation_weights([0.1, 0.2, 0.3], 0) == ([0.1, 0.2, 0.3], [])
    weights, interior = interpolation_weights([0.3, 0.6], 2)
    assert weights == pytest.approx([0.1, 0.6])
    assert [i for i, _, _ in interior] == [0, 0]
    assert [x for _, t, w in interior for x in (t, w)] == pytest.approx([1 / 3, 0.1, 2 / 3, 0.1])


def test_n0_reproduces_the_spec_example():
    """One checkpoint (no interval: n changes nothing), and two with eta = (0.1, 0): 0.8 and 0.5."""
    for ws, rates, n in (([W0], [0.1], 0), ([W0], [0.1], 3), ([W0, W1], [0.1, 0.0], 0)):
        out = run(ws, rates, n)
        assert out["influence"].value == pytest.approx(0.8, rel=1e-12)
        assert out["self_influence"].values == pytest.approx([0.5], rel=1e-12)
        assert out["path_points"].value == (len(ws) - 1) * n


def test_least_squares_closed_form():
    """w(t) = (1,-1) + t (-1, 2): residuals r(t) = -1 + 3t on z, -2 on z', so g . g' = 8 - 24t,
    ||g||^2 = 5 (3t - 1)^2, ||g'||^2 = 20. With eta = (0.1, 0.05) and n points:
    TracIn = 0.1 (8 - 12 n/(n+1)) - 0.8; n = 3: -0.9, self-influence 0.359375 + 1, test 2 + 1;
    n -> oo: 0.1 * integral(8 - 24t) - 0.8 = -1.2."""
    out = run([W0, W1], [0.1, 0.05], 3)
    assert out["influence"].value == pytest.approx(-0.9, rel=1e-12)
    assert out["self_influence"].values == pytest.approx([1.359375], rel=1e-12)
    assert out["test_self_influence"].values == pytest.approx([3.0], rel=1e-12)
    for n in (1, 5, 17):
        got = run([W0, W1], [0.1, 0.05], n)
        want = brute_force(n)
        assert got["influence"].value == pytest.approx(want[0], rel=1e-12)
        assert got["influence"].value == pytest.approx(0.1 * (8 - 12 * n / (n + 1)) - 0.8, rel=1e-12)
        assert got["self_influence"].values == pytest.approx([want[1]], rel=1e-12)
        assert got["test_self_influence"].values == pytest.approx([want[2]], rel=1e-12)
    n = 2000
    assert run([W0, W1], [0.1, 0.05], n)["influence"].value == pytest.approx(-1.2, abs=1.3 / n)


@pytest.fixture(scope="module")
def gpt2_path(models, tmp_path_factory):
    """The tiny GPT-2 and a perturbed copy: the two ends of the path."""
    import transformers as tf

    root = tmp_path_factory.mktemp("path")
    model = tf.AutoModelForCausalLM.from_pretrained(models["gpt2"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(root / "end")
    copy_tokenizer(models["gpt2"], root / "end")
    return {"start": models["gpt2"], "end": root / "end"}


def test_gpt2_path_equals_backward_passes_at_interpolated_weights(gpt2_path, tokenizer):
    """n = 2: eta_0/3 at t = 0, 1/3, 2/3 and eta_1 at the end, each point's per-example gradients from
    one backward per example of a model loaded with the interpolated weights (float64)."""
    corpus = builtin_corpus()
    split = {"train": corpus[:5], "test": corpus[5:8]}
    rates = [0.3, 0.1]
    res = analyze(gpt2_path, data=split, metrics=[TRACIN],
                  params={TRACIN: {"learning_rates": rates, "interpolation_points": 2}},
                  config=RunConfig(batch_size=4, max_length=32, dtype="float64"))
    result = res.get(TRACIN)
    assert result.ok, result.reason
    start, end = load_hf(gpt2_path["start"]), load_hf(gpt2_path["end"])
    train, test = tokenize(tokenizer, split["train"]), tokenize(tokenizer, split["test"])
    moving = load_hf(gpt2_path["start"])
    want = torch.zeros(5, 3, dtype=torch.float64)
    want_self = torch.zeros(5, dtype=torch.float64)
    a, b = dict(start.named_parameters()), dict(end.named_parameters())
    for t, weight in ((0.0, 0.1), (1 / 3, 0.1), (2 / 3, 0.1), (1.0, 0.1)):
        with torch.no_grad():
            for name, p in moving.named_parameters():
                p.copy_((1 - t) * a[name] + t * b[name])
        g_train, g_test = example_grads(moving, train, summed=True), example_grads(moving, test, summed=True)
        want += weight * g_train @ g_test.T
        want_self += weight * (g_train**2).sum(1)
    torch.testing.assert_close(res.tensor(TRACIN, "influence"), want, rtol=1e-8, atol=1e-12)
    assert result.value("self_influence") == pytest.approx(want_self.tolist(), rel=1e-8)
    assert result.value("path_points") == 2
    check_declared_passes(result)  # 2 points x (2 train + 1 test batches), one vmapped call each
    assert result.passes_declared == {"per_example_backward": 6}
    check_declared_cost(result)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_a_path_of_one_model_is_tracincp(models, bert, family):
    """The same model twice: every interior point is that model, so with the weights summing to the
    same total the interpolated TracIn equals TracInCP (LLaMA: grouped-query attention; BERT: the
    seeded masked-LM targets, one call per example)."""
    folder = bert if family == "bert" else models[family]
    corpus = builtin_corpus()
    split = {"train": corpus[:4], "test": corpus[4:6]}
    out = {}
    for n in (0, 2):
        res = analyze({"first": folder, "second": folder}, data=split, metrics=[TRACIN],
                      params={TRACIN: {"learning_rates": [0.2, 0.1], "interpolation_points": n}},
                      config=RunConfig(batch_size=4, max_length=24))
        result = res.get(TRACIN)
        assert result.ok, result.reason
        check_declared_passes(result)
        check_declared_cost(result)
        out[n] = (res.tensor(TRACIN, "influence"), result)
    torch.testing.assert_close(out[2][0], out[0][0], rtol=1e-5, atol=1e-9)
    calls = 2 * (4 + 2) if family == "bert" else 2 * 2
    assert out[2][1].passes_declared == {"per_example_backward": calls}
