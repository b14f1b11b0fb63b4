"""fisher.stein maths and functional API: closed forms (metric-specs section 1), float64 brute force, estimators."""

from __future__ import annotations

import math

import pytest
import torch
from fisher_stein_reference import brute_force_fisher
from tensorscope_fisher import fisher_stein, fisher_stein_eig
from tensorscope_fisher.spectral import spectral_summary
from tensorscope_fisher.stein import (
    Extension,
    centred_moment,
    eig_fisher,
    forward_site,
    next_token_draws,
    sampled_fisher,
    score_vectors,
    topk_fisher,
)
from tensorscope_fisher.stein_api import _sites, model_view
from transformers import AutoModelForCausalLM

from tensorscope_core.plugin_api import BadParameterError, UnsupportedModelError


def _load(folder, dtype=torch.float64, attn="eager"):
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn).to(dtype).eval()


def _entry(model, layer):
    """The module whose input is h: block ``layer``, or the final norm for layer = n_layers."""
    body = model.transformer if hasattr(model, "transformer") else model.model
    blocks = body.h if hasattr(body, "h") else body.layers
    return blocks[layer] if layer < len(blocks) else (body.ln_f if hasattr(body, "ln_f") else body.norm)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a.double() - b.double()) / torch.linalg.matrix_norm(b.double()))


@pytest.fixture(scope="module")
def f64(models):
    return {family: _load(models[family]) for family in ("gpt2", "llama")}


@pytest.fixture(scope="module")
def ids(f64):
    return torch.randint(4, f64["gpt2"].config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def gpt2_site(f64, ids):
    """The site at the last position of row 0, layer 1, on tiny GPT-2 in float64, with its exact F."""
    model = f64["gpt2"]
    with model_view(model) as view:
        site = _sites(view, 1, ids[:1], -1)[0]
        logits = forward_site(view, 1, site, grad=False).logits
        yield view, site, torch.softmax(logits[0], dim=-1), fisher_stein(model, 1, ids[:1])[0]


# -- closed forms: a linear upper network z = W_U h, so J_g = I and F = M ------------------------


def test_two_token_closed_form():
    """V=2, d=1, z=(h, -h): F = 4 sigma(2h)(1 - sigma(2h)); F(0) = 1, F(0.5) = 0.786448."""
    weight = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    for h, want in ((0.0, 1.0), (0.5, 0.786448)):
        p = torch.softmax(weight @ torch.tensor([h], dtype=torch.float64), dim=0)
        got = float(centred_moment(weight, p))
        assert got == pytest.approx(want, rel=1e-6)
        sigma = 1 / (1 + math.exp(-2 * h))
        assert got == pytest.approx(4 * sigma * (1 - sigma), rel=1e-12)


def test_identity_like_unembedding_at_zero():
    """W_U = [[1,0],[0,1],[0,0]], h = 0 (p uniform): F = [[2/9,-1/9],[-1/9,2/9]], eigenvalues 1/9, 1/3."""
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    p = torch.softmax(weight @ torch.zeros(2, dtype=torch.float64), dim=0)
    fisher = centred_moment(weight, p)
    torch.testing.assert_close(fisher, torch.tensor([[2 / 9, -1 / 9], [-1 / 9, 2 / 9]], dtype=torch.float64),
                               rtol=1e-12, atol=1e-15)
    summary = spectral_summary(torch.linalg.eigvalsh(fisher))
    assert summary["eigmin"] == pytest.approx(1 / 9) and summary["eigmax"] == pytest.approx(1 / 3)
    assert summary["trace"] == pytest.approx(4 / 9) and summary["cond"] == pytest.approx(3.0)
    assert summary["energy_r8"] == 1.0 and summary["effective_rank"] == 2.0  # 1/3 / (4/9) = 0.75 < 0.9


def test_spectral_summary_definitions():
    lam = torch.tensor([5.0, 3.0, 1.0, 1.0] + [0.0] * 16, dtype=torch.float64)
    s = spectral_summary(lam[torch.randperm(20, generator=torch.Generator().manual_seed(0))])
    assert (s["trace"], s["eigmax"], s["eigmin"], s["cond"]) == (10.0, 5.0, 0.0, math.inf)
    assert s["energy_r8"] == 1.0 and s["effective_rank"] == 3.0  # 0.5, 0.8, 0.9 -> k = 3
    flat = spectral_summary(torch.ones(32))
    assert flat["energy_r8"] == 0.25 and flat["energy_r16"] == 0.5 and flat["effective_rank"] == 29.0
    assert math.isnan(spectral_summary(torch.zeros(3))["cond"])


def test_equal_unembedding_rows_give_zero(models, ids):
    """All rows of W_U equal: the logits are all equal whatever h is, so F = 0 (shift invariance)."""
    model = _load(models["llama"])
    with torch.no_grad():
        model.lm_head.weight.copy_(model.lm_head.weight[:1].expand_as(model.lm_head.weight))
    exact = fisher_stein(model, 1, ids)
    sampled = fisher_stein(model, 1, ids, method="sampled", draws=8)
    assert float(exact.abs().max()) < 1e-12 and float(sampled.abs().max()) < 1e-12


# -- exact against the float64 brute force --------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize(("layer", "position"), [(0, -1), (1, 5), (2, -1), (1, 0)])
def test_exact_matches_brute_force(f64, ids, family, layer, position):
    model = f64[family]
    got = fisher_stein(model, layer, ids, position=position)
    assert got.shape == (2, 32, 32) and got.dtype == torch.float64
    for row in range(2) if layer == 1 and position == 5 else (1,):
        want = brute_force_fisher(model, _entry(model, layer), ids[row], position % ids.shape[1])
        assert _rel(got[row], want) <= 1e-6
        torch.testing.assert_close(got[row], got[row].T, rtol=0, atol=0)
        assert float(torch.linalg.eigvalsh(got[row]).min()) >= -1e-12 * float(got[row].abs().max())


def test_scores_average_to_zero_and_reproduce_f(gpt2_site):
    """sum_y p_y s_y = 0 to machine precision, and sum_y p_y s_y s_y^T = F."""
    view, site, p, exact = gpt2_site
    scores = score_vectors(view, 1, site, torch.arange(p.numel()))
    assert float((p @ scores).norm()) <= 1e-14 * float(scores.norm(dim=1).max())
    assert _rel(scores.T @ (scores * p[:, None]), exact) <= 1e-12


# -- the estimators -------------------------------------------------------------------------------


def test_sampled_converges_at_inverse_sqrt_rate(gpt2_site):
    """RMS error over seeds falls by 4 from S to 16 S draws; the mean over seeds is unbiased (z-score)."""
    view, site, p, exact = gpt2_site
    reps, small = 60, 4
    gen = torch.Generator().manual_seed(11)
    rms = {}
    means = {}
    for draws in (small, 16 * small):
        estimates = torch.stack([sampled_fisher(view, 1, site, draws, gen) for _ in range(reps)])
        errors = torch.linalg.matrix_norm(estimates - exact)
        rms[draws] = float(errors.pow(2).mean().sqrt())
        means[draws] = estimates.mean(dim=0)
    assert 3.0 <= rms[small] / rms[16 * small] <= 5.3
    for draws, mean in means.items():  # ||mean - F|| ~ rms / sqrt(reps); far beyond that would mean bias
        assert float(torch.linalg.matrix_norm(mean - exact)) <= 3 * rms[draws] / math.sqrt(reps)


def test_topk_error_within_reported_bound(gpt2_site):
    view, site, p, exact = gpt2_site
    for k in (5, 50, 300):
        top = topk_fisher(view, 1, site, k)
        assert top.dropped_mass == pytest.approx(1 - float(torch.topk(p, k).values.sum()), abs=1e-12)
        gap = exact - top.fisher
        assert float(torch.linalg.matrix_norm(gap)) <= float(torch.trace(gap)) + 1e-12 <= top.error_bound + 1e-12
        assert float(torch.linalg.eigvalsh(gap).min()) >= -1e-12  # not renormalised: F_topk <= F
    full = topk_fisher(view, 1, site, p.numel())
    assert full.dropped_mass == 0.0 and full.error_bound == 0.0 and _rel(full.fisher, exact) <= 1e-12


@pytest.mark.parametrize(("family", "dtype", "rtol"), [("gpt2", torch.float64, 1e-8), ("llama", torch.float32, 1e-4)])
def test_eig_matches_dense_eigh(models, ids, family, dtype, rtol):
    """Lanczos on the JVP/VJP product against eigh of the exact matrix, on a model loaded with SDPA
    (switched to eager for the JVP and back afterwards)."""
    model = _load(models[family], dtype, attn="sdpa")
    values, vectors = fisher_stein_eig(model, 1, ids[:1], rank=4)
    assert model.config._attn_implementation == "sdpa"
    dense_values, dense_vectors = torch.linalg.eigh(fisher_stein(model, 1, ids[:1])[0].double())
    torch.testing.assert_close(values[0].double(), dense_values.flip(0)[:4], rtol=rtol, atol=0)
    overlap = (vectors[0].double().T @ dense_vectors.flip(1)[:, :4]).abs().diagonal()
    assert float(overlap.min()) >= 1 - 100 * rtol


def test_eig_float64_llama_matches_dense_eigh_without_ghosts(f64, ids):
    """Float64 LLaMA: its norms, softmaxes and rotary tables run in float32 inside transformers, so the
    products are float32-accurate only. Lanczos must be told (as fisher.lanczos does), or converged Ritz
    vectors are never reorthogonalised against and their eigenvalues come back as copies (issue 20:
    22% off dense eigh, residual norms 3e-3 to 5e-2)."""
    model = f64["llama"]
    rank = 8
    values, _ = fisher_stein_eig(model, 1, ids[:1], rank=rank)
    dense = torch.linalg.eigvalsh(fisher_stein(model, 1, ids[:1])[0].double()).flip(0)[:rank]
    got = values[0].double()
    torch.testing.assert_close(got, dense, rtol=1e-6, atol=1e-6 * float(dense[0]))
    gaps = (got[:-1] - got[1:]) / got[0]
    assert float(gaps.min()) > 1e-6, f"duplicated eigenvalues: {got.tolist()}"
    with model_view(model) as view:  # the metric's path (eig_fisher) reports the true residuals
        result = eig_fisher(view, 1, _sites(view, 1, ids[:1], -1), rank)
    assert float(result.residual_norms.max()) <= 1e-5 * float(dense[0])


def test_next_token_draws_respect_temperature_and_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    nucleus = next_token_draws(logits, Extension(400, 1.0, 0.6), gen)
    assert set(nucleus.tolist()) == {0, 1}  # the smallest prefix with mass >= 0.6
    greedy = next_token_draws(logits, Extension(50, 1e-4, 1.0), gen)
    assert set(greedy.tolist()) == {0}
    plain = next_token_draws(logits, Extension(4000, 1.0, 1.0), gen)
    assert abs(float((plain == 2).double().mean()) - 0.2) < 0.03


# -- errors ---------------------------------------------------------------------------------------


def test_bad_inputs_raise_typed_errors(f64, models, ids):
    model = f64["gpt2"]
    with pytest.raises(BadParameterError, match="out of range.*0..2"):
        fisher_stein(model, 3, ids)
    with pytest.raises(BadParameterError, match="position 12 is out of range"):
        fisher_stein(model, 1, ids, position=12)
    with pytest.raises(BadParameterError, match="fisher_stein_eig"):
        fisher_stein(model, 1, ids, method="eig")  # type: ignore[arg-type]
    handle = model.lm_head.register_forward_hook(lambda module, args, out: out / 2)  # a temperature after the head
    try:
        with pytest.raises(UnsupportedModelError, match="method='sampled'"):
            fisher_stein(model, 1, ids)
        assert fisher_stein(model, 1, ids, method="sampled", draws=4).shape == (2, 32, 32)
    finally:
        handle.remove()
    from transformers import BertForMaskedLM

    with pytest.raises(UnsupportedModelError, match="causal LM"):
        fisher_stein(BertForMaskedLM.from_pretrained(models["bert"]), 1, ids)
