"""circuits.qkov: spec section 5 composition cases, float64 brute force from the raw Hugging Face
weights (d x d and V x V matrices), GQA against the equivalent MHA model, and rotary offsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf
from tensorscope_circuits.factored import composition_scores, copying_scores, rotary_matrix
from tensorscope_circuits.qkov import rotary_frequencies
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tensorscope_core import GenericAdapter, ModelSource, analyze, plan
from tensorscope_core.models.load import load_model  # core internal: no public loader of a ModelView
from tensorscope_core.plugins import get_registry  # core internal: the installed adapters, for load_model
from tensorscope_core.testing import check_roundtrip, run_metric, tiny_config

METRIC = "circuits.qkov"


def test_composition_of_u_u_transpose_is_one():
    """Spec 5.1: L = R = u u^T for a unit u gives score 1 (one head per layer, factors u and u^T)."""
    u = torch.randn(6, 1, dtype=torch.float64)
    u /= u.norm()

    def factors(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return u[None], u.T[None]

    scores = composition_scores(factors, factors, 2)
    assert scores[0, 0, 1, 0].item() == pytest.approx(1.0, abs=1e-12)
    assert scores[1, 0, 0, 0].item() == 0.0 and scores[0, 0, 0, 0].item() == 0.0  # only earlier -> later


def test_orthogonal_subspaces_give_zero_q_composition():
    """Spec 5.1: OV writes only into span(e1), W_Q reads only span(e2): Q-composition 0."""
    d, r = 6, 2
    g = torch.Generator().manual_seed(0)
    w_v = torch.randn(d, r, generator=g, dtype=torch.float64)
    w_o = torch.zeros(r, d, dtype=torch.float64)
    w_o[:, 0] = torch.randn(r, generator=g, dtype=torch.float64)  # output in span(e1)
    w_q = torch.zeros(d, r, dtype=torch.float64)
    w_q[1] = torch.randn(r, generator=g, dtype=torch.float64)  # reads e2 only
    w_k = torch.randn(d, r, generator=g, dtype=torch.float64)
    score = composition_scores(lambda layer: (w_v[None], w_o[None]), lambda layer: (w_q[None], w_k.T[None]), 2)
    assert score[0, 0, 1, 0].item() == pytest.approx(0.0, abs=1e-15)
    w_q[0] = 1.0  # now reading e1 too: nonzero
    assert composition_scores(lambda layer: (w_v[None], w_o[None]), lambda layer: (w_q[None], w_k.T[None]),
                              2)[0, 0, 1, 0].item() > 0.1


def test_copying_scores_of_known_spectra():
    positive, negative, rotation = (torch.tensor(v, dtype=torch.complex128) for v in
                                    ([1.0, 2.0, 0.5], [-1.0, -3.0], [1j, -1j]))
    assert [float(x) for x in copying_scores(positive)] == pytest.approx([1.0, 1.0])
    assert [float(x) for x in copying_scores(negative)] == pytest.approx([-1.0, 0.0])
    assert [float(x) for x in copying_scores(rotation)] == pytest.approx([0.0, 0.0], abs=1e-15)
    mixed = torch.tensor([3.0, -1.0], dtype=torch.complex128)
    assert [float(x) for x in copying_scores(mixed)] == pytest.approx([0.5, 0.75])


def raw_heads(model) -> tuple[list[torch.Tensor], ...]:
    """Per layer [H, d, r] W_Q, W_K, W_V (K/V of query head h: kv head h // group) and [H, r, d] W_O,
    read straight from the Hugging Face modules (not through the adapter), float64."""
    cfg = model.config
    qs, ks, vs, os_ = [], [], [], []
    if cfg.model_type == "gpt2":
        d, H = cfg.n_embd, cfg.n_head
        r = d // H
        for block in model.transformer.h:
            w = block.attn.c_attn.weight.detach().double()  # Conv1D [d, 3d], x @ w
            q, k, v = w[:, :d], w[:, d:2 * d], w[:, 2 * d:]
            qs.append(torch.stack([q[:, h * r:(h + 1) * r] for h in range(H)]))
            ks.append(torch.stack([k[:, h * r:(h + 1) * r] for h in range(H)]))
            vs.append(torch.stack([v[:, h * r:(h + 1) * r] for h in range(H)]))
            o = block.attn.c_proj.weight.detach().double()  # [d, d], x @ o
            os_.append(torch.stack([o[h * r:(h + 1) * r] for h in range(H)]))
        return qs, ks, vs, os_
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    r = cfg.hidden_size // H
    for layer in model.model.layers:
        a = layer.self_attn
        wq, wk, wv, wo = (m.weight.detach().double() for m in (a.q_proj, a.k_proj, a.v_proj, a.o_proj))
        qs.append(torch.stack([wq[h * r:(h + 1) * r].T for h in range(H)]))
        kv = [h * Hkv // H for h in range(H)]
        ks.append(torch.stack([wk[g * r:(g + 1) * r].T for g in kv]))
        vs.append(torch.stack([wv[g * r:(g + 1) * r].T for g in kv]))
        os_.append(torch.stack([wo[:, h * r:(h + 1) * r].T for h in range(H)]))
    return qs, ks, vs, os_


def assert_grid(got, want, rel: float, abs: float = 0.0) -> None:
    """Nested lists (layer x head grids) equal within tolerance."""
    assert torch.allclose(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                          rtol=rel, atol=abs), (got, want)


def fro(m: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(m))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_matches_float64_brute_force(family, models, tmp_path):
    res = analyze(models[family], metrics=[METRIC])
    result = res.get(METRIC)
    model = tf.AutoModelForCausalLM.from_pretrained(models[family])
    qs, ks, vs, os_ = raw_heads(model)
    n_layers, H = len(qs), qs[0].shape[0]
    qk = [[qs[lay][h] @ ks[lay][h].T for h in range(H)] for lay in range(n_layers)]
    ov = [[vs[lay][h] @ os_[lay][h] for h in range(H)] for lay in range(n_layers)]
    assert_grid(result.value("qk_norm"), [[fro(m) for m in row] for row in qk], rel=1e-9)
    assert_grid(result.value("ov_norm"), [[fro(m) for m in row] for row in ov], rel=1e-9)
    sv = res.tensor(METRIC, "ov_singular_values")
    want_sv = torch.stack([torch.stack([torch.linalg.svdvals(m)[:sv.shape[-1]] for m in row]) for row in ov])
    assert torch.allclose(sv.double(), want_sv, rtol=1e-5, atol=1e-7)
    for mode, right in (("q", qk), ("k", [[m.T for m in row] for row in qk]), ("v", ov)):
        got = res.tensor(METRIC, f"composition_{mode}").double()
        want = torch.zeros_like(got)
        for l1 in range(n_layers):
            for l2 in range(l1 + 1, n_layers):
                for h1 in range(H):
                    for h2 in range(H):
                        L, R = ov[l1][h1], right[l2][h2]
                        want[l1, h1, l2, h2] = fro(L @ R) / (fro(L) * fro(R))
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-8), mode
    E = model.get_input_embeddings().weight.detach().double()
    U = model.get_output_embeddings().weight.detach().double()
    full_ov = [[E @ m @ U.T for m in row] for row in ov]  # V x V, brute force
    assert_grid(result.value("full_ov_norm"), [[fro(m) for m in row] for row in full_ov], rel=1e-8)
    assert_grid(result.value("full_qk_norm"), [[fro(E @ m @ E.T) for m in row] for row in qk], rel=1e-8)
    eig = res.tensor(METRIC, "full_ov_eigenvalues").double()
    for lay, h in ((0, 0), (n_layers - 1, H - 1)):  # V x V eigendecompositions are slow: two heads
        lam = np.linalg.eigvals(full_ov[lay][h].numpy())
        top = lam[np.argsort(-np.abs(lam))][:eig.shape[2]]
        got = torch.view_as_complex(eig[lay, h].contiguous()).numpy()
        assert np.sort_complex(got.astype(np.complex128)) == pytest.approx(np.sort_complex(top), rel=1e-4, abs=1e-6)
        want_copy = lam.real.sum() / np.abs(lam).sum()
        assert result.value("copying")[lay][h] == pytest.approx(want_copy, rel=1e-4, abs=1e-7)
        want_pos = np.clip(lam.real, 0, None).sum() / np.abs(lam).sum()
        assert result.value("copying_positive")[lay][h] == pytest.approx(want_pos, rel=1e-4, abs=1e-7)
    check_roundtrip(res, tmp_path / "out")


@pytest.fixture(scope="module")
def gqa_and_mha(models, tmp_path_factory):
    """The tiny GQA LLaMA (4 query heads, 2 KV heads) and the MHA LLaMA whose k_proj / v_proj hold
    the GQA weights repeat_interleave'd over heads (TransformerLens' equivalence)."""
    gqa = tf.AutoModelForCausalLM.from_pretrained(models["llama"])
    cfg = gqa.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    r = cfg.hidden_size // H
    mha_cfg = tiny_config("llama", cfg.vocab_size)
    mha_cfg.num_key_value_heads = H
    mha = tf.AutoModelForCausalLM.from_config(mha_cfg)
    state = gqa.state_dict()
    for name, value in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            state[name] = value.reshape(Hkv, r, -1).repeat_interleave(H // Hkv, dim=0).reshape(H * r, -1)
    mha.load_state_dict(state)
    folder = tmp_path_factory.mktemp("mha") / "mha"
    mha.save_pretrained(folder)
    tf.AutoTokenizer.from_pretrained(models["llama"]).save_pretrained(folder)  # same token candidates
    return models["llama"], folder


def test_gqa_equals_mha_with_repeated_kv(gqa_and_mha):
    """Spec 5.2: identical logits, identical circuits and composition scores, identical head scores."""
    gqa_folder, mha_folder = gqa_and_mha
    ids = torch.randint(5, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = [tf.AutoModelForCausalLM.from_pretrained(f)(ids).logits for f in (gqa_folder, mha_folder)]
    assert torch.allclose(logits[0], logits[1], atol=1e-5)
    metrics = [METRIC, "circuits.head_scores"]
    params = {"circuits.head_scores": {"sequence_length": 10, "n_sequences": 3, "bos": "never"}}
    res = [analyze(f, metrics=metrics, params=params) for f in (gqa_folder, mha_folder)]
    a, b = (r.get(METRIC) for r in res)
    for field, value in a.values.items():
        if value.kind == "tensor":
            assert torch.allclose(res[0].tensor(METRIC, field), res[1].tensor(METRIC, field), atol=1e-6), field
        elif value.kind == "per_head":
            assert_grid(value.values, b.values[field].values, rel=1e-9)
    for kind in ("previous_token", "duplicate_token", "induction"):
        x, y = (r.get("circuits.head_scores").value(kind) for r in res)
        assert_grid(x, y, rel=0, abs=1e-6)


def hf_rotary(model, x: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Rows of ``x`` [n, d_head] rotated at their positions by the model's own rotary code."""
    body = model.model if hasattr(model, "model") else model.gpt_neox
    pos = torch.tensor([positions])
    cos, sin = body.rotary_emb(x[None].float(), pos)
    rotary = cos.shape[-1]
    rot, keep = x[None, None, :, :rotary], x[None, None, :, rotary:]
    q, _ = apply_rotary_pos_emb(rot.float(), rot.float(), cos, sin)
    return torch.cat([q[0, 0].double(), keep[0, 0]], dim=-1)


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_rotary_matrix_reproduces_the_models_rotary_scores(family, models, neox_model):
    """(q R(i-j)) . k equals the dot product of q rotated at position i and k rotated at j
    (Hugging Face apply_rotary_pos_emb; NeoX rotates 2 of its 8 head dims)."""
    folder = models["llama"] if family == "llama" else neox_model
    view = load_model(ModelSource(str(folder)), get_registry().adapters)
    inv_freq, scaling = rotary_frequencies(view)
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, view.d_head, generator=g, dtype=torch.float64)
    for i, j in ((5, 2), (9, 9), (3, 7), (30, 0)):
        want = float(hf_rotary(view.model, q[None], [i])[0] @ hf_rotary(view.model, k[None], [j])[0])
        got = float(q @ rotary_matrix(inv_freq, view.d_head, i - j, scaling) @ k)
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_offset_sweep_matches_brute_force_rotated_circuit(models):
    """QK(D) built by rotating the query rows of every basis vector with the model's own rotary code
    at position D (keys at 0): the metric's qk_norm_by_offset and composition_q_by_offset agree."""
    offsets = (1, 3)
    res = analyze(models["llama"], metrics=[METRIC], params={METRIC: {"rotary_offsets": offsets}})
    model = tf.AutoModelForCausalLM.from_pretrained(models["llama"])
    qs, ks, vs, os_ = raw_heads(model)
    H = qs[0].shape[0]
    ov0 = [vs[0][h] @ os_[0][h] for h in range(H)]
    norms = res.tensor(METRIC, "qk_norm_by_offset").double()
    comp = res.tensor(METRIC, "composition_q_by_offset").double()
    for n, delta in enumerate(offsets):
        for lay in range(2):
            for h in range(H):
                q_rows = hf_rotary(model, qs[lay][h], [delta] * qs[lay][h].shape[0])
                qk = q_rows @ ks[lay][h].T
                assert norms[n, lay, h].item() == pytest.approx(fro(qk), rel=1e-5)
                if lay == 1:
                    for h0 in range(H):
                        want = fro(ov0[h0] @ qk) / (fro(ov0[h0]) * fro(qk))
                        assert comp[n, 0, h0, 1, h].item() == pytest.approx(want, rel=1e-4)
    assert "offset 0" in res.get(METRIC).values["rotary"].text


def test_rotary_dim_zero_gives_the_same_circuit_at_every_offset(tmp_path):
    """Spec 5.3: a NeoX with partial_rotary_factor 0 has QK(D) = QK(0) for every D."""
    cfg = tiny_config("neox", 100)
    cfg.rope_parameters = {**cfg.rope_parameters, "partial_rotary_factor": 0.0}
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "neox0")
    res = analyze(tmp_path / "neox0", metrics=[METRIC], params={METRIC: {"rotary_offsets": (1, 5, 20)}})
    assert torch.allclose(rotary_matrix(torch.zeros(0), 8, 7), torch.eye(8, dtype=torch.float64))
    by_offset = res.tensor(METRIC, "qk_norm_by_offset").double()
    zero = torch.tensor(res.get(METRIC).value("qk_norm"), dtype=torch.float64)
    assert torch.allclose(by_offset, zero.expand_as(by_offset), rtol=1e-6)
    comp = res.tensor(METRIC, "composition_k_by_offset")
    assert torch.allclose(comp, res.tensor(METRIC, "composition_k").expand_as(comp), atol=1e-6)


def test_no_rotary_and_matrices(models):
    result = run_metric(METRIC, models["gpt2"], params={"matrices": True})
    assert "qk_norm_by_offset" not in result.values and "no rotary" in result.values["rotary"].text
    assert result.values["W_QK"].shape == [2, 4, 32, 32]


def test_encoder_has_circuits_and_unmapped_heads_skip(models):
    bert = run_metric(METRIC, models["bert"])
    assert "copying" in bert.values and bert.values["composition_v"].shape == [2, 4, 2, 4]
    generic = GenericAdapter(blocks="transformer.h", attn="attn", mlp_out="mlp.c_proj", n_heads=4)
    result = analyze(models["gpt2"], metrics=[METRIC], adapter=generic).get(METRIC)
    assert result.status == "skipped" and "per-head" in result.reason


@pytest.mark.parametrize(("family", "params"), [("llama", {}), ("llama", {"matrices": True}), ("gpt2", {})])
def test_declared_results_are_the_tensors_the_run_keeps(models, family, params):
    """Rotary offsets (LLaMA) and the matrices add tensors; the plan declares exactly their bytes."""
    (planned,) = plan(models[family], None, [METRIC], params={METRIC: params})
    res = analyze(models[family], None, [METRIC], params={METRIC: params})
    tensors = [k for k, v in res.get(METRIC).values.items() if getattr(v, "kind", "") == "tensor"]
    assert planned.declared_results[METRIC] == sum(res.tensor(METRIC, k).nbytes for k in tensors)


@pytest.mark.parametrize("embedding_on", ["cpu", "disk"])
def test_a_dispatched_model_declares_the_embedding_copies_it_reads(models, tmp_path, embedding_on):
    """On a dispatched model with the embedding offloaded, ``weight_of`` loads the embedding and the
    unembedding (GPT-2's are one tied tensor, loaded once per module) while the full circuits' Gram matrices
    are made: the declared working memory grows by those two tensors. Where the model holds the embedding,
    ``weight_of`` reads its own tensor and nothing is added. Found by the dispatched memory audit (the 135M
    shape: 68 MiB declared, 280 MiB held, when ``weight_of`` copied even a held embedding)."""
    from tensorscope_core import RunConfig

    device_map = {"transformer.wte": embedding_on, "transformer.wpe": "cpu", "transformer.drop": "cpu",
                  "transformer.h.0": "cpu", "transformer.h.1": "disk", "transformer.ln_f": "cpu",
                  "lm_head": embedding_on}  # tied to wte: placed with it
    plain = plan(models["gpt2"], None, [METRIC])[0]
    spread = plan(models["gpt2"], None, [METRIC], config=RunConfig(device_map=device_map,
                                                                    offload_dir=tmp_path / "offload"))[0]
    embedding = tf.AutoModelForCausalLM.from_pretrained(models["gpt2"]).transformer.wte.weight
    loaded = 2 * embedding.numel() * embedding.element_size() if embedding_on == "disk" else 0
    assert spread.declared_transient[METRIC] - plain.declared_transient[METRIC] == loaded
