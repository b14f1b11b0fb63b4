"""fisher.spectrum against known answers: a hand-built gradient set with a known spectrum, and eigh of the
explicitly built p x p Fisher of every head and MLP of tiny GPT-2 and LLaMA-GQA models (float64)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from fisher_spectrum_reference import dense_spectrum, example_grads, head_vector, mlp_vector
from tensorscope_fisher.gram import gram_eigenvalues, nonzero_part
from tensorscope_fisher.spectrum import Spectrum, SpectrumParams
from transformers import AutoModelForCausalLM

from tensorscope_core import RunConfig, analyze
from tensorscope_core.plugin_api import model_view
from tensorscope_core.testing import check_declared_cost, check_roundtrip, random_token_data, tiny_model

ROWS = [torch.arange(n) * 7 % 290 + 5 + n for n in (9, 4, 12, 6, 3, 10)]  # 6 examples, padded batches of 4


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """GPT-2 and LLaMA (2 query heads on 1 key/value head) with d_model 8, small enough for p x p eigh."""
    root = tmp_path_factory.mktemp("spectrum-models")
    return {f: tiny_model(f, root / f, seed=1, n_layers=2, d_model=8, n_heads=2) for f in ("gpt2", "llama")}


def spectrum(model, data, batch_size=4, **params):
    res = analyze(model, data=data, metrics=["fisher.spectrum"], params={"fisher.spectrum": params},
                  config=RunConfig(batch_size=batch_size, max_length=32, dtype="float64"))
    return res, res.get("fisher.spectrum")


def test_hand_built_gradients_with_known_spectrum():
    """G = diag(3, 2, 1, 0) Qᵀ with orthonormal Q: F = GᵀG/4 has eigenvalues 9/4, 1, 1/4, 0 (and p-4 zeros)."""
    q, _ = torch.linalg.qr(torch.randn(10, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    grads = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)) @ q.T
    eig = gram_eigenvalues(grads)
    assert torch.allclose(eig, torch.tensor([2.25, 1.0, 0.25, 0.0], dtype=torch.float64), atol=1e-14)
    assert torch.allclose(eig, torch.linalg.eigvalsh(grads.T @ grads / 4).flip(0)[:4], atol=1e-14)
    part = nonzero_part(eig, n=4, p=10, eps=torch.finfo(torch.float64).eps)
    assert torch.allclose(part, torch.tensor([2.25, 1.0, 0.25], dtype=torch.float64), atol=1e-14)
    assert nonzero_part(torch.zeros(3, dtype=torch.float64), 3, 5, 1e-16).numel() == 3  # zero spectrum kept


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_blocks_match_dense_pxp_fisher(family, small):
    """Every head and MLP: the Gram spectrum and its summary against eigh of the explicit p x p Fisher
    (empirical labels, padded batches; per-example gradients by a loop, blocks sliced by hand)."""
    res, result = spectrum(small[family], ROWS, fisher="empirical")
    model = AutoModelForCausalLM.from_pretrained(small[family], attn_implementation="eager", dtype=torch.float64)
    grads = example_grads(model, ROWS)
    n_heads, n_kv = model.config.num_attention_heads, getattr(model.config, "num_key_value_heads", 2)
    attn = res.tensor("fisher.spectrum", "attn_eigenvalues")
    mlp = res.tensor("fisher.spectrum", "mlp_eigenvalues")
    assert result.value("n_examples") == 6 and attn.shape == (2, 2, 6)
    assert result.values["mlp_trace"].axis == "block" and len(result.value("mlp_trace")) == 2
    rtol = 1e-9 if family == "gpt2" else 1e-5  # LLaMA's padded forward differs from unpadded at ~1e-7
    for layer in range(2):
        blocks = [(attn[layer, h], result.value("attn_trace")[layer][h], result.value("attn_cond")[layer][h],
                   result.value("attn_effective_rank")[layer][h], result.value("attn_energy_r8")[layer][h],
                   [head_vector(family, g, layer, h, n_heads, n_kv, 4) for g in grads]) for h in range(2)]
        blocks.append((mlp[layer], result.value("mlp_trace")[layer], result.value("mlp_cond")[layer],
                       result.value("mlp_effective_rank")[layer], result.value("mlp_energy_r8")[layer],
                       [mlp_vector(family, g, layer) for g in grads]))
        for eig, trace, cond, erank, energy8, vectors in blocks:
            dense = dense_spectrum(vectors)
            assert len(vectors[0]) > 6  # p > n: the Gram trick is what gives the spectrum
            assert torch.allclose(eig, dense[:6], rtol=rtol, atol=rtol * float(dense[0]))
            assert trace == pytest.approx(float(dense.sum()), rel=rtol)
            nonzero = dense[dense > 1e-9 * dense[0]]
            assert nonzero.numel() == 6  # six independent examples
            assert cond == pytest.approx(float(nonzero[0] / nonzero[-1]), rel=100 * rtol)
            energy = torch.cumsum(dense, 0) / dense.sum()
            assert erank == int((energy < 0.9 - 1e-12).sum()) + 1
            assert energy8 == pytest.approx(float(energy[7]), rel=rtol)
    assert result.value("head_params") == len(head_vector(family, grads[0], 0, 0, n_heads, n_kv, 4))


def test_true_fisher_of_one_example_is_a_drawn_label_score(small):
    """True Fisher, one example with one target: each block's single eigenvalue is ||∇_b log p_y||² for the
    label y drawn from the model, the same y for every block (all vocabulary labels checked by hand)."""
    ids = torch.tensor([[17, 40]])
    res, result = spectrum(small["gpt2"], ids)
    eig = res.tensor("fisher.spectrum", "attn_eigenvalues")[:, :, 0]  # [layers, heads], n = 1
    model = AutoModelForCausalLM.from_pretrained(small["gpt2"], attn_implementation="eager", dtype=torch.float64)
    params = dict(model.named_parameters())
    logp = torch.log_softmax(model(ids).logits[0, 0], dim=-1)
    matches = []
    for y in range(logp.shape[0]):
        grads = dict(zip(params, torch.autograd.grad(logp[y], list(params.values()), retain_graph=True), strict=True))
        norms = torch.tensor([[float(head_vector("gpt2", grads, lay, h, 2, 2, 4).pow(2).sum()) for h in range(2)]
                              for lay in range(2)], dtype=torch.float64)
        if torch.allclose(norms, eig, rtol=1e-9, atol=0):
            matches.append(y)
    assert len(matches) == 1


def test_max_examples_cost_and_roundtrip(models, tmp_path):
    ids = random_token_data(300, n=12, length=10, seed=2)
    res = analyze(models["llama"], data=ids, metrics=["fisher.spectrum"],
                  params={"fisher.spectrum": {"max_examples": 5}}, config=RunConfig(batch_size=4))
    result = res.get("fisher.spectrum")
    assert result.value("n_examples") == 5 and res.tensor("fisher.spectrum", "attn_eigenvalues").shape[-1] == 5
    check_declared_cost(result)
    check_roundtrip(res, tmp_path / "out")
    _, bert = spectrum(models["bert"], ids)
    assert bert.ok and bert.value("n_examples") == 12
    check_declared_cost(bert)


def test_model_without_head_map_is_skipped(models):
    with model_view(AutoModelForCausalLM.from_pretrained(models["gpt2"])) as view:
        reason = Spectrum.skip_reason(SpectrumParams(), dataclasses.replace(view, head_weights_fn=None), None)
    assert reason is not None and "per-head weights" in reason


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_pieces_sized_from_shapes_are_the_listed_pieces(models, family):
    """A large model's pieces are sized from the per-head views' shapes and strides, without listing their
    entries: the entries and runs equal those of the pieces listed entry by entry. A head's W_Q and W_K
    are transposed views of whole rows of their projections, one run each (counted in the view's order
    they were one run per entry: the runs' index, int64 pairs, was declared at 32 GiB for Llama-2-7B)."""
    from tensorscope_fisher.fisher_grads import layout_of
    from tensorscope_fisher.head_blocks import layer_piece_sizes, layer_pieces

    from tensorscope_core.models.load import ModelSource, load_model  # core internal: no public loader of a view
    from tensorscope_core.plugins import get_registry

    view = load_model(ModelSource(str(models[family])), get_registry().adapters)
    layout = layout_of(view)
    for layer in range(view.n_layers):
        listed = [(p.size, p.runs.shape[0]) for p in layer_pieces(view, layer, layout).pieces]
        assert layer_piece_sizes(view, layer, layout) == listed
