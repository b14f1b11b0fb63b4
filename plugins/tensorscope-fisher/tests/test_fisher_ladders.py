"""Memory ladders: every rung against the exact result (disk: the same bits; fewer examples, parameter
subsets and diagonals: the exact computation on what they keep; sketches, float32 and local Lanczos: within
the accuracy each rung states), its declared state true, and the planner choosing a rung under a tight budget."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from fisher_curvature_reference import dense_hessian
from fisher_diagonal_reference import load_causal
from tensorscope_fisher.lanczos import Lanczos, top_eigenpairs

from tensorscope_core import RunConfig, analyze, builtin_corpus, plan
from tensorscope_core.plugin_api import TensorValue
from tensorscope_core.testing import check_declared_cost, random_token_data, run_at_rung, tiny_model

CONFIG = RunConfig(batch_size=4, max_length=32, dtype="float64")
DIAG, KFAC, SPECTRUM, HESSIAN = "fisher.diagonal", "fisher.kfac", "fisher.spectrum", "hessian.lanczos"

#: one metric at a rung (pinned) or as asked: ok, the rung recorded, the declaration true
run = partial(run_at_rung, config=CONFIG)



@pytest.fixture(scope="module")
def tasks():
    corpus = builtin_corpus()
    return {"a": corpus[:6], "b": corpus[6:10]}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """GPT-2, 1 block, d_model 8, vocabulary 64: ~1.7k parameters, small enough for a dense Hessian."""
    return tiny_model("gpt2", tmp_path_factory.mktemp("ladder") / "gpt2", with_tokenizer=False, n_layers=1,
                      d_model=8, n_heads=2)


# -- the Lanczos solver and hessian.lanczos / fisher.lanczos -----------------------------------------------

def test_local_lanczos_merges_ghosts():
    """The dominant eigenvalue converges early and comes back as ghost copies without a basis: local
    reorthogonalisation reports it once, and the next nine as the dense spectrum has them."""
    spectrum = torch.cat([torch.tensor([100.0], dtype=torch.float64),
                          torch.linspace(0, 1, 599, dtype=torch.float64) ** 3 * 20])
    result = top_eigenpairs(lambda v: spectrum * v, 600, 10, max_iter=300, tol=1e-10, reorthogonalise="local")
    torch.testing.assert_close(result.eigenvalues, spectrum.sort(descending=True).values[:10], rtol=1e-10, atol=0)
    assert result.converged and result.eigenvectors.shape == (600, 0)
    assert float(result.residual_norms.max()) <= 1e-10 * 100


@pytest.mark.parametrize("mode", ["selective", "local"])
def test_solver_holds_what_it_declares(mode):
    solver = Lanczos(50, 3, max_iter=20, dtype=torch.float32, reorthogonalise=mode)
    held = sum(t.numel() * t.element_size() for t in (solver.basis, solver.products, solver.ritz, solver.applied,
                                                        solver.work))
    assert held == Lanczos.held_bytes(50, 3, 20, mode, 4)


def _dense_top(model_folder, ids: torch.Tensor, names: list[str] | None = None) -> torch.Tensor:
    """The descending eigenvalues of the dense Hessian, restricted to the parameters ``names``."""
    model = load_causal(model_folder)
    dense = dense_hessian(model, ids)
    dense = (dense + dense.T) / 2
    if names is not None:
        sizes = [(n, p.numel()) for n, p in model.named_parameters()]
        starts = torch.cumsum(torch.tensor([0] + [s for _, s in sizes]), 0)
        keep = torch.cat([torch.arange(int(starts[i]), int(starts[i + 1])) for i, (n, _) in enumerate(sizes)
                          if n in names])
        dense = dense[keep][:, keep]
    return torch.linalg.eigvalsh(dense).flip(0)


@pytest.mark.parametrize("products", ["kept-graph", "recomputed"])
@pytest.mark.parametrize("rung", ["local", "last-block"])
def test_lanczos_rungs_match_the_dense_hessian(small, rung, products):
    """local: the dense Hessian's top 3 within its bounds; last-block: those of the principal block of the
    last block's parameters (lower bounds of the whole model's, by interlacing); with the products through
    kept graphs and recomputed."""
    ids = random_token_data(64, n=2, length=6, seed=1)
    _, result = run(small, ids, HESSIAN, rung, k=3, tol=1e-9, max_iter=120, keep_vectors=True, products=products)
    block = [n for n, _ in load_causal(small).named_parameters() if n.startswith("transformer.h.0.")]
    want = _dense_top(small, ids, block if rung == "last-block" else None)[:3]
    got = torch.tensor(result.value("eigenvalues"), dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert "eigenvectors" not in result.values and max(result.value("residual_bounds")) <= 1e-8 * float(want[0])
    if rung == "last-block":
        assert result.value("n_params") == sum(p.numel() for n, p in load_causal(small).named_parameters()
                                               if n in block)
        assert (got <= _dense_top(small, ids)[:3] + 1e-9).all()


def test_lanczos_fewer_iterations_keep_true_residuals(small):
    """max-iter-25: at most 25 products; each reported pair's true residual r bounds its distance to the
    dense spectrum (|lambda - lambda_i| <= r for some i)."""
    ids = random_token_data(64, n=2, length=6, seed=1)
    _, result = run(small, ids, HESSIAN, "max-iter-25", k=3, tol=1e-12, max_iter=120)
    dense = _dense_top(small, ids)
    assert result.value("iterations") <= 25
    for value, residual in zip(result.value("eigenvalues"), result.value("residual_norms"), strict=True):
        assert float((dense - value).abs().min()) <= residual + 1e-10


def test_hessian_keeps_graphs_where_they_fit(tmp_path):
    """Planned on the 135M shape (a config alone, 8 sequences of 64 tokens in batches of 2): at a budget
    where the local rung fits with its kept graphs (4 batches, 0.55 GiB each), it runs so; a byte less and
    the planner recomputes the products instead of giving up the rung's accuracy."""
    import transformers as tf

    from tensorscope_core.testing import REAL_135M
    tf.LlamaConfig(**REAL_135M, max_position_embeddings=2048, tie_word_embeddings=True).save_pretrained(tmp_path)
    gen = torch.Generator().manual_seed(0)
    data = {t: torch.randint(0, REAL_135M["vocab_size"], (4, 64), generator=gen) for t in ("train", "test")}

    def planned(budget: int | str):  # type: ignore[no-untyped-def]
        config = RunConfig(batch_size=2, max_length=64, memory_budget=budget)
        (p,) = plan(str(tmp_path), data, [HESSIAN], config=config)
        return p.rungs[HESSIAN].split(" ")[0], p.peak_bytes

    rung, peak = planned("8GiB")
    assert rung == "local"
    assert planned(peak - 1)[0] == "local-recomputed"


# -- fisher.diagonal ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def diagonal_exact(models, tasks):
    res, result = run(models["gpt2"], tasks, DIAG)
    return res, result


@pytest.mark.parametrize("rung", ["float32", "pooled", "mean-only", "true-only"])
def test_diagonal_rungs_keep_the_fields_they_say(models, tasks, diagonal_exact, rung):
    """Each rung's fields equal the exact ones to float32 rounding (relative to the parameter's largest entry:
    CI ends are differences that may nearly cancel); the fields it drops are absent."""
    exact_res, exact = diagonal_exact
    res, result = run(models["gpt2"], tasks, DIAG, rung)
    for field, value in result.values.items():
        if isinstance(value, TensorValue):
            want = exact_res.tensor(DIAG, field)
            torch.testing.assert_close(res.tensor(DIAG, field).double(), want, rtol=1e-5,
                                       atol=1e-5 * float(want.abs().max()), msg=field)
        else:
            assert value.value == pytest.approx(exact.values[field].value, rel=1e-12)
    fields = set(result.values)
    assert any(f.startswith("true/a/") for f in fields) == (rung != "pooled")
    assert any(f.startswith("true_var/") for f in fields) == (rung == "float32")
    assert any(f.startswith("empirical/") for f in fields) == (rung in ("float32", "mean-only"))


# -- fisher.kfac -------------------------------------------------------------------------------------------

def test_kfac_diagonal_factors_are_the_exact_diagonals(models, tasks):
    """diagonal_over=33: factors of 33 rows (inputs of d_model + bias) exact, the larger ones their exact
    diagonals; trace exact; eigmax a lower bound, eigmin an upper bound, damped logdet an upper bound."""
    exact_res, exact = run(models["gpt2"], tasks, KFAC)
    res, result = run(models["gpt2"], tasks, KFAC, diagonal_over=33)
    exact_rows = {r[0]: dict(zip(exact.values["capacity"].columns, r, strict=True))
                  for r in exact.values["capacity"].rows}
    for row in result.values["capacity"].rows:
        got = dict(zip(result.values["capacity"].columns, row, strict=True))
        want = exact_rows[got["module"]]
        for factor, dim in (("A", got["dim_A"]), ("G", got["dim_G"])):
            full = exact_res.tensor(KFAC, f"{factor}/{got['module']}")
            if dim > 33:
                torch.testing.assert_close(res.tensor(KFAC, f"{factor}_diag/{got['module']}"), full.diagonal(),
                                           rtol=1e-12, atol=0)
            else:
                torch.testing.assert_close(res.tensor(KFAC, f"{factor}/{got['module']}"), full, rtol=1e-12, atol=0)
        assert got["trace"] == pytest.approx(want["trace"], rel=1e-10)
        assert got["eigmax"] <= want["eigmax"] * (1 + 1e-10) and got["eigmin"] >= want["eigmin"] - 1e-12
        assert got["logdet"] >= want["logdet"] - 1e-9
        assert got["diagonal"] == ("+".join(f for f, d in (("A", got["dim_A"]), ("G", got["dim_G"])) if d > 33)
                                   or "none")


def test_kfac_diagonal_rung(models, tasks):
    _, result = run(models["gpt2"], tasks, KFAC, "diagonal")
    assert {r[-1] for r in result.values["capacity"].rows} == {"A+G"}


def test_natural_gradient_steps_down_like_kfac(models, tasks):
    """fisher.natural_gradient offers fisher.kfac's rungs; its 'diagonal' rung is the run asked with
    diagonal_over=0 (whose direction the natural-gradient tests check against grad / (g a^T + lambda)),
    and holds what it declares."""
    _, stepped = run(models["gpt2"], tasks, "fisher.natural_gradient", "diagonal")
    _, asked = run(models["gpt2"], tasks, "fisher.natural_gradient", diagonal_over=0)
    assert stepped.values == asked.values


# -- fisher.spectrum ---------------------------------------------------------------------------------------

def test_spectrum_disk_is_the_same_bits(models, tasks):
    exact_res, _ = run(models["llama"], tasks, SPECTRUM)
    res, _ = run(models["llama"], tasks, SPECTRUM, "disk")
    for field in ("attn_eigenvalues", "mlp_eigenvalues"):
        assert torch.equal(res.tensor(SPECTRUM, field), exact_res.tensor(SPECTRUM, field))


def test_spectrum_sketch_within_its_bound(models, tasks):
    """k = 256 sketches every piece (heads' 512 entries, the MLP's 6144): traces exact (exact diagonal),
    each eigenvalue within 3 x sqrt(2/k) x its block's trace."""
    exact_res, exact = run(models["llama"], tasks, SPECTRUM)
    res, result = run(models["llama"], tasks, SPECTRUM, projection_dim=256)
    bound = math.sqrt(2 / 256)
    assert result.value("eig_error_rel") == pytest.approx(bound)
    for kind in ("attn", "mlp"):
        got, want = res.tensor(SPECTRUM, f"{kind}_eigenvalues"), exact_res.tensor(SPECTRUM, f"{kind}_eigenvalues")
        trace = want.sum(-1, keepdim=True)
        torch.testing.assert_close(got.sum(-1, keepdim=True), trace, rtol=1e-9, atol=0)
        assert ((got - want).abs() <= 3 * bound * trace).all()


def test_spectrum_fewer_examples_is_the_exact_spectrum_of_those(models, tasks, no_disk_room):
    """fewer-examples: half the examples with k=1024 sketches, which keep the heads' 512-entry pieces
    exact: the heads equal the exact run on those examples, the MLPs' traces too."""
    exact_res, exact = run(models["llama"], tasks, SPECTRUM, max_examples=5)
    res, result = run(models["llama"], tasks, SPECTRUM, "fewer-examples")
    assert result.value("n_examples") == 5
    torch.testing.assert_close(res.tensor(SPECTRUM, "attn_eigenvalues"), exact_res.tensor(SPECTRUM, "attn_eigenvalues"),
                               rtol=1e-12, atol=1e-15)
    assert result.value("mlp_trace") == pytest.approx(exact.value("mlp_trace"), rel=1e-9)


# -- the planner -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("metric", "rung"), [(DIAG, "float32"), (KFAC, "diagonal"), (SPECTRUM, "disk")])
def test_a_tight_budget_picks_a_rung(models, tasks, metric, rung):
    """A budget just under the asked plan's peak: the planner steps the metric down, the result records
    the rung it ran at, and its declared state is what it held."""
    config = CONFIG.model_copy(update={"memory_budget": "64GiB", "min_micro_batch": 4})
    (full,) = plan(models["llama"], tasks, [metric], config=config)
    budget = full.peak_bytes - full.declared_state[metric] // 4
    res = analyze(models["llama"], data=tasks, metrics=[metric],
                  config=config.model_copy(update={"memory_budget": budget}))
    result = res.get(metric)
    assert result.ok and result.rung is not None and result.rung.chosen_by == "budget"
    assert result.rung.name == rung
    check_declared_cost(result)
