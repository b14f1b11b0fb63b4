"""fisher.lanczos and hessian.lanczos against dense eigh of the explicitly built GGN / Hessian, and
the products against the closed forms of metric-specs §8."""

from __future__ import annotations

import pytest
import torch
from fisher_curvature_reference import dense_ggn, dense_hessian
from fisher_diagonal_reference import load_causal
from tensorscope_fisher.curvature import ggn_product, hessian_product, kept_ggn_product, kept_graph_product
from tensorscope_fisher.lanczos import top_eigenpairs

from tensorscope_core import RunConfig, analyze
from tensorscope_core.testing import check_declared_cost, random_token_data, tiny_model

CONFIG = RunConfig(batch_size=4, dtype="float64")
PARAMS = {"k": 5, "tol": 1e-8, "max_iter": 120, "keep_vectors": True}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """1 block, d_model 8, 2 heads (LLaMA: 1 key/value head), vocabulary 64: ~1.7k parameters."""
    root = tmp_path_factory.mktemp("curvature")
    return {f: tiny_model(f, root / f, with_tokenizer=False, n_layers=1, d_model=8, n_heads=2)
            for f in ("gpt2", "llama")}


def _check_top5(result, dense: torch.Tensor) -> None:
    values, vectors = torch.linalg.eigh((dense + dense.T) / 2)
    want = values.flip(0)[:5]
    got = torch.tensor(result.value("eigenvalues"), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert max(result.value("residual_norms")) < 1e-4 * float(want[0])
    assert result.value("converged") == 1.0
    assert "note" not in result.values


@pytest.mark.parametrize(("family", "metrics"), [("gpt2", ("fisher.lanczos", "hessian.lanczos")),
                                                 ("llama", ("fisher.lanczos", "hessian.lanczos"))])
def test_top5_match_dense_eigh(small, family, metrics):
    ids = random_token_data(64, n=2, length=6, seed=1)
    res = analyze(small[family], data=ids, metrics=list(metrics), params={m: PARAMS for m in metrics},
                  config=CONFIG)
    model = load_causal(small[family])
    for metric in metrics:
        result = res.get(metric)
        assert result.ok, result.reason
        dense = dense_ggn(model, ids) if metric == "fisher.lanczos" else dense_hessian(model, ids)
        _check_top5(result, dense)
        top = res.tensor(metric, "eigenvectors")[:, 0]
        assert float((dense @ top - result.value("lambda_max") * top).norm()) < 1e-4 * result.value("lambda_max")
        assert result.value("n_examples") == 2
        check_declared_cost(result)


@pytest.mark.parametrize("metric", ["fisher.lanczos", "hessian.lanczos"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kept_graphs_and_recomputed_products_agree(small, family, metric):
    """The products through kept graphs (two backwards for the GGN, reverse-over-reverse for the Hessian)
    and from scratch (a JVP and a VJP; forward-over-reverse) give the same spectrum over two kept batches,
    and equal the dense one. To 1e-6: LLaMA's RMSNorm and rotary tables are float32 even in a float64 model
    (GPT-2 agrees to 1e-12)."""
    ids = random_token_data(64, n=3, length=6, seed=2)
    config = RunConfig(batch_size=2, dtype="float64")  # two kept batches: 2 + 1 rows
    got = [analyze(small[family], data=ids, metrics=[metric], config=config,
                   params={metric: {**PARAMS, "products": products}}).get(metric)
           for products in ("kept-graph", "recomputed")]
    assert all(r.ok for r in got), [r.reason for r in got]
    torch.testing.assert_close(torch.tensor(got[0].value("eigenvalues")), torch.tensor(got[1].value("eigenvalues")),
                               rtol=1e-6 if family == "llama" else 1e-12, atol=0)
    model = load_causal(small[family])
    _check_top5(got[0], dense_ggn(model, ids) if metric == "fisher.lanczos" else dense_hessian(model, ids))


def test_kept_graph_product_of_two_least_squares_losses():
    """§8 case 3 split in two losses: L = ||X1 w - y1||^2 + ||X2 w - y2||^2 has H v = 2 (X1^T X1 + X2^T X2) v,
    the same vector every product (the graph is reused); a weight the losses never read has a zero row,
    and so has one they read linearly (its gradient is constant)."""
    gen = torch.Generator().manual_seed(0)
    x = [torch.randn(5, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    y = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(2)]
    w = {"w": torch.randn(4, generator=gen, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64),
         "unused": torch.randn(2, dtype=torch.float64)}
    losses = [lambda p, i=i: (x[i] @ p["w"] - y[i]).pow(2).sum() + p["b"].sum() for i in range(2)]
    product = kept_graph_product(losses, w)
    v = {n: torch.randn(t.shape, generator=gen, dtype=torch.float64) for n, t in w.items()}
    want = 2 * (x[0].T @ x[0] + x[1].T @ x[1]) @ v["w"]
    for _ in range(2):
        hv = product(v)
        torch.testing.assert_close(hv["w"], want, rtol=1e-13, atol=0)
        assert hv["b"].abs().max() == 0 and hv["unused"].abs().max() == 0
    assert not any(t.requires_grad for t in w.values())  # the caller's weights are left as they were


def test_kept_ggn_product_sums_its_batches():
    """Two batches through a nonlinear feature map (logits tanh(X_b V) W^T): the kept product equals the sum of
    the recomputed ones, every product (the graphs are reused); a weight the logits never read has a zero row."""
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(2)]
    masks = [torch.tensor([1, 1, 0, 1, 1]), torch.tensor([0, 1, 1, 1, 1])]
    w = {"W": torch.randn(4, 3, generator=gen, dtype=torch.float64),
         "V": torch.randn(3, 3, generator=gen, dtype=torch.float64), "unused": torch.randn(2, dtype=torch.float64)}
    fns = [(lambda p, x=x: torch.tanh(x @ p["V"]) @ p["W"].T, m) for x, m in zip(xs, masks, strict=True)]
    kept = kept_ggn_product(fns, w, 0.25)
    for seed in (3, 4):
        g = torch.Generator().manual_seed(seed)
        v = {n: torch.randn(t.shape, generator=g, dtype=torch.float64) for n, t in w.items()}
        parts = [ggn_product(f, w, m, 0.25)(v) for f, m in fns]
        got = kept(v)
        for name in ("W", "V"):
            torch.testing.assert_close(got[name], parts[0][name] + parts[1][name], rtol=1e-12, atol=1e-14)
        assert got["unused"].abs().max() == 0


def test_per_token_normalisation(small):
    """per='token' divides by the 15 target tokens instead of the 3 examples: lambda_max x 3/15."""
    ids = random_token_data(64, n=3, length=6, seed=1)
    params = {"k": 1, "tol": 1e-9, "max_iter": 60}
    lam = [analyze(small["gpt2"], data=ids, metrics=["fisher.lanczos"], config=CONFIG,
                   params={"fisher.lanczos": {**params, "per": per}}).get("fisher.lanczos").value("lambda_max")
           for per in ("example", "token")]
    assert lam[1] == pytest.approx(lam[0] * 3 / 15, rel=1e-7)


def test_least_squares_hvp():
    """§8 case 3: L = (1/n)||Xw - y||^2 has H v = (2/n) X^T X v."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 4, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float64)
    w = {"w": torch.randn(4, generator=gen, dtype=torch.float64)}
    v = {"w": torch.randn(4, generator=gen, dtype=torch.float64)}
    hv = hessian_product(lambda p: (x @ p["w"] - y).pow(2).sum() / 7, w)(v)
    torch.testing.assert_close(hv["w"], 2 / 7 * x.T @ x @ v["w"], rtol=1e-13, atol=0)


def test_quadratic_top2_through_the_hvp():
    """§8 case 2: L = 1/2 w^T H w, H = diag(5, 2, -1): Lanczos on the HVP gives 5, 2."""
    h = torch.diag(torch.tensor([5.0, 2.0, -1.0], dtype=torch.float64))
    w = {"w": torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)}
    product = hessian_product(lambda p: 0.5 * p["w"] @ h @ p["w"], w)
    result = top_eigenpairs(lambda v: product({"w": v})["w"], 3, 2)
    assert result.eigenvalues.tolist() == pytest.approx([5.0, 2.0], abs=1e-12)


def test_ggn_equals_hessian_for_softmax_regression():
    """Logits linear in the weights (z = X W^T): the cross-entropy's Hessian is its Gauss-Newton
    matrix, sum_t x_t x_t^T kron (diag p_t - p_t p_t^T)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    labels = torch.randint(4, (5,), generator=gen)
    w = {"W": torch.randn(4, 3, generator=gen, dtype=torch.float64)}
    v = {"W": torch.randn(4, 3, generator=gen, dtype=torch.float64)}
    mask = torch.tensor([1, 1, 0, 1, 1])
    logits = lambda p: x @ p["W"].T  # noqa: E731
    loss = lambda p: (torch.nn.functional.cross_entropy(logits(p), labels, reduction="none") * mask).sum() / 2  # noqa: E731
    gv = ggn_product(logits, w, mask, 0.5)(v)["W"]
    torch.testing.assert_close(gv, hessian_product(loss, w)(v)["W"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(kept_ggn_product([(logits, mask)], w, 0.5)(v)["W"], gv, rtol=1e-12, atol=1e-14)
    p = torch.softmax(x @ w["W"].T, dim=-1)
    want = sum(mask[t] * (torch.diag(p[t]) - torch.outer(p[t], p[t])) @ v["W"] @ torch.outer(x[t], x[t])
               for t in range(5)) / 2
    torch.testing.assert_close(gv, want, rtol=1e-12, atol=1e-14)


def test_no_targets_is_skipped_naming_the_fix(small):
    """One-token sequences have no next token: the core skips every metric on the loss, saying why."""
    res = analyze(small["gpt2"], data=random_token_data(64, n=2, length=1), metrics=["hessian.lanczos"],
                  config=CONFIG)
    result = res.get("hessian.lanczos")
    assert result.status == "skipped" and "no next token to predict" in result.reason


@pytest.mark.parametrize("reorthogonalise", ["selective", "local"])
def test_an_unconverged_run_says_what_its_values_are_and_the_fix(small, reorthogonalise):
    """Stopped after 5 products at a tolerance no float64 run meets there: converged is 0, and the note says the
    values lie within their residuals of eigenvalues but their ranks may be too high, and to raise max_iter."""
    ids = random_token_data(64, n=2, length=6, seed=1)
    params = {"k": 5, "tol": 1e-14, "max_iter": 5, "reorthogonalise": reorthogonalise}
    result = analyze(small["llama"], data=ids, metrics=["hessian.lanczos"], params={"hessian.lanczos": params},
                     config=CONFIG).get("hessian.lanczos")
    assert result.ok and result.value("converged") == 0.0
    note = result.values["note"].text
    assert "within 5 products" in note and "raise max_iter" in note
    assert ("residual norm" if reorthogonalise == "selective" else "residual bound") in note
