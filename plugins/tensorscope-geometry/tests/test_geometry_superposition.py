"""superposition.features: the spec's frames, regime boundaries, chunking, sources and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tensorscope_geometry import frames
from tensorscope_geometry.frames import frame_stats, regime, welch_bound
from transformers import AutoModelForCausalLM

from tensorscope_core import analyze
from tensorscope_core.plugin_api import BadParameterError
from tensorscope_core.testing import run_metric

MERCEDES = torch.tensor([[math.cos(2 * math.pi * k / 3), math.sin(2 * math.pi * k / 3)] for k in range(3)],
                        dtype=torch.float64)


def brute_force(f: np.ndarray) -> dict[str, float]:
    """Every statistic from the explicit n x n Gram matrix (float64)."""
    n, d = f.shape
    g = f @ f.T
    norms = np.sqrt(np.diag(g))
    u = f / norms[:, None]
    cos = u @ u.T
    off = ~np.eye(n, dtype=bool)
    proj = ((u @ f.T) ** 2).sum(1)
    return {"dim": norms ** 2 / proj, "inter": proj - norms ** 2, "mean_cos": np.abs(cos[off]).mean(),
            "max_cos": np.abs(cos[off]).max(), "fp": (cos ** 2).sum(), "rms": np.sqrt((g[off] ** 2).mean()),
            "dstar": d / (norms ** 2).sum()}


def test_mercedes_frame():
    s = frame_stats(MERCEDES)
    assert s.welch_bound == pytest.approx(0.5, abs=1e-15)
    assert s.max_abs_cos == pytest.approx(0.5, abs=1e-15)
    assert s.mean_abs_cos == pytest.approx(0.5, abs=1e-15)
    assert s.frame_potential == pytest.approx(4.5, abs=1e-12) and s.frame_potential_min == 4.5
    assert torch.allclose(s.feature_dimensionality, torch.full((3,), 2 / 3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(s.interference, torch.full((3,), 0.5, dtype=torch.float64), atol=1e-12)
    assert s.dimensions_per_feature == pytest.approx(2 / 3, abs=1e-12)
    assert regime(s.n, s.d, s.max_abs_cos, 0.1, 1.05) == "superposition_optimal"


def test_orthonormal_basis_and_antipodal_pair():
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    s = frame_stats(q[:3])  # 3 orthonormal features in R^5
    assert torch.allclose(s.feature_dimensionality, torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(s.interference, torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert s.max_abs_cos < 1e-15 and s.gram_offdiag_rms < 1e-7  # rms: square root of a float64 difference
    assert s.dimensions_per_feature == pytest.approx(5 / 3) and s.frame_potential == pytest.approx(3.0)
    assert s.welch_bound == 0.0 and s.frame_potential_min == 3.0
    assert regime(s.n, s.d, s.max_abs_cos, 0.1, 1.05) == "none"
    pair = frame_stats(torch.tensor([[1.0], [-1.0]], dtype=torch.float64))  # spec section 3, case 2
    assert pair.feature_dimensionality.tolist() == [0.5, 0.5] and pair.interference.tolist() == [1.0, 1.0]
    assert pair.dimensions_per_feature == 0.5 and pair.max_abs_cos == pytest.approx(1.0)


def test_zero_features_are_left_out_and_counted():
    f = torch.cat([MERCEDES, torch.zeros(1, 2, dtype=torch.float64)])
    s = frame_stats(f)
    assert s.n == 3 and s.n_zero == 1 and math.isnan(float(s.feature_dimensionality[3]))
    assert s.frame_potential == pytest.approx(4.5)
    with pytest.raises(ValueError, match="at least two"):
        frame_stats(torch.zeros(3, 2))


def test_regime_thresholds_at_their_boundaries():
    assert regime(4, 4, 0.1, orthogonal_cos=0.1, welch_slack=1.05) == "none"  # n == d: not superposition
    assert regime(4, 4, 0.1 + 1e-9, 0.1, 1.05) == "correlated"
    w = welch_bound(10, 4)
    assert w == pytest.approx(math.sqrt(6 / 36))
    assert regime(10, 4, 1.05 * w, 0.1, 1.05) == "superposition_optimal"
    assert regime(10, 4, 1.05 * w + 1e-9, 0.1, 1.05) == "superposition"
    assert regime(5, 4, 0.0, 0.1, 1.05) == "superposition_optimal"  # n > d is superposition whatever the angles


def test_chunked_pairs_equal_the_dense_computation(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(37, 6, generator=gen, dtype=torch.float64) * torch.rand(37, 1, generator=gen, dtype=torch.float64)
    dense = frame_stats(f)
    monkeypatch.setattr(frames, "CHUNK_ENTRIES", 40)  # one row per chunk
    chunked = frame_stats(f)
    assert chunked.max_abs_cos == pytest.approx(dense.max_abs_cos, rel=1e-14)
    assert chunked.mean_abs_cos == pytest.approx(dense.mean_abs_cos, rel=1e-14)
    ref = brute_force(f.numpy())
    assert np.allclose(dense.feature_dimensionality.numpy(), ref["dim"], rtol=1e-10)
    assert np.allclose(dense.interference.numpy(), ref["inter"], rtol=1e-10)
    assert dense.mean_abs_cos == pytest.approx(ref["mean_cos"], rel=1e-12)
    assert dense.max_abs_cos == pytest.approx(ref["max_cos"], rel=1e-12)
    assert dense.frame_potential == pytest.approx(ref["fp"], rel=1e-10)
    assert dense.gram_offdiag_rms == pytest.approx(ref["rms"], rel=1e-9)
    assert dense.dimensions_per_feature == pytest.approx(ref["dstar"], rel=1e-12)



def test_zero_rows_dropped_in_place_by_chunks_leave_the_input_alone(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    f = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    f[[0, 9, 10, 39]] = 0.0
    given = f.clone()
    dense = frame_stats(f[f.norm(dim=1) > 0])
    monkeypatch.setattr(frames, "CHUNK_ENTRIES", 12)  # two rows per chunk of the in-place compaction
    chunked = frame_stats(f)
    assert torch.equal(f, given)  # float64 features are copied, never normalised in place
    assert chunked.n == 36 and chunked.n_zero == 4
    kept = ~torch.isnan(chunked.feature_dimensionality)
    assert torch.allclose(chunked.feature_dimensionality[kept], dense.feature_dimensionality, rtol=1e-14)
    assert chunked.frame_potential == pytest.approx(dense.frame_potential, rel=1e-14)
    assert chunked.max_abs_cos == pytest.approx(dense.max_abs_cos, rel=1e-14)

@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_mlp_out_directions_match_brute_force(family, models):
    result = run_metric("superposition.features", models[family], ["the cat sat"])
    model = AutoModelForCausalLM.from_pretrained(models[family]) if family != "bert" else None
    if family == "gpt2":
        w = model.transformer.h[1].mlp.c_proj.weight.detach()  # Conv1D [d_mlp, d_model]: rows write resid
    elif family == "llama":
        w = model.model.layers[1].mlp.down_proj.weight.detach().T  # Linear [d_model, d_mlp]: columns
    else:
        from transformers import AutoModelForMaskedLM
        w = AutoModelForMaskedLM.from_pretrained(models[family]).bert.encoder.layer[1].output.dense.weight.detach().T
    ref = brute_force(w.double().numpy())
    assert result.value("max_abs_cos")[1] == pytest.approx(ref["max_cos"], rel=1e-10)
    assert result.value("mean_abs_cos")[1] == pytest.approx(ref["mean_cos"], rel=1e-10)
    assert result.value("mean_feature_dimensionality")[1] == pytest.approx(ref["dim"].mean(), rel=1e-9)
    assert result.value("frame_potential")[1] == pytest.approx(ref["fp"], rel=1e-9)
    n, d = w.shape
    assert result.value("d_over_n") == [d / n, d / n]
    assert result.values["d_over_n"].labels == ["mlp_out 0", "mlp_out 1"]
    assert result.value("welch_bound")[0] == pytest.approx(math.sqrt((n - d) / (d * (n - 1))))
    assert [r[4] for r in result.values["regimes"].rows] == ["superposition", "superposition"]


def test_embedding_and_unembedding_sources(models):
    emb = run_metric("superposition.features", models["llama"], None, params={"source": "embed"})
    model = AutoModelForCausalLM.from_pretrained(models["llama"])
    ref = brute_force(model.model.embed_tokens.weight.detach().double()[1:].numpy())  # row 0: zero padding row
    assert emb.value("n_zero") == [1.0] and emb.value("frame_potential")[0] == pytest.approx(ref["fp"], rel=1e-9)
    un = run_metric("superposition.features", models["llama"], None, params={"source": "unembed"})
    ref = brute_force(model.lm_head.weight.detach().double().numpy())
    assert un.value("max_abs_cos")[0] == pytest.approx(ref["max_cos"], rel=1e-10)


def test_sae_decoder_from_safetensors(tmp_path, models):
    """A user-supplied 'decoder': the Mercedes frame as rows (and as columns)."""
    path = tmp_path / "sae.safetensors"
    save_file({"W_dec": MERCEDES.float().contiguous(), "W_T": MERCEDES.T.float().contiguous()}, str(path))
    rows = run_metric("superposition.features", models["gpt2"], None,
                      params={"source": "sae", "path": str(path), "tensor": "W_dec"})
    cols = run_metric("superposition.features", models["gpt2"], None,
                      params={"source": "sae", "path": str(path), "tensor": "W_T", "features_along": "columns"})
    for r in (rows, cols):
        assert r.value("max_abs_cos") == pytest.approx([0.5], abs=1e-7)  # the file holds float32
        assert r.value("frame_potential_ratio") == pytest.approx([1.0], abs=1e-6)
        assert r.value("mean_feature_dimensionality") == pytest.approx([2 / 3], abs=1e-6)
        assert r.values["regimes"].rows[0][4] == "superposition_optimal"
    assert rows.values["regimes"].rows[0][0] == "sae.safetensors:W_dec"


def test_named_parameter_source(models):
    result = run_metric("superposition.features", models["gpt2"], None,
                        params={"source": "parameter", "parameter": "transformer.h.{layer}.mlp.c_fc.weight",
                                "features_along": "columns"})
    model = AutoModelForCausalLM.from_pretrained(models["gpt2"])
    ref = brute_force(model.transformer.h[0].mlp.c_fc.weight.detach().double().T.numpy())  # unit i reads column i
    assert result.value("frame_potential")[0] == pytest.approx(ref["fp"], rel=1e-9)
    assert result.values["d_over_n"].labels == ["transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.weight"]


def test_bad_input_is_refused_with_the_fix(models, tmp_path):
    with pytest.raises(BadParameterError, match="needs parameter="):
        analyze(models["gpt2"], metrics=["superposition.features"], params={"superposition.features": {
            "source": "parameter"}})
    with pytest.raises(BadParameterError, match="no such safetensors file"):
        analyze(models["gpt2"], metrics=["superposition.features"], params={"superposition.features": {
            "source": "sae", "path": str(tmp_path / "missing.safetensors"), "tensor": "W"}})
    path = tmp_path / "s.safetensors"
    save_file({"W_dec": torch.zeros(3, 2, 2)}, str(path))
    with pytest.raises(BadParameterError, match="has no tensor 'W'"):
        analyze(models["gpt2"], metrics=["superposition.features"], params={"superposition.features": {
            "source": "sae", "path": str(path), "tensor": "W"}})
    with pytest.raises(BadParameterError, match="a matrix"):
        analyze(models["gpt2"], metrics=["superposition.features"], params={"superposition.features": {
            "source": "sae", "path": str(path), "tensor": "W_dec"}})
    res = analyze(models["gpt2"], metrics=["superposition.features"], params={"superposition.features": {
        "source": "parameter", "parameter": "transformer.h.0.mlp.nope.weight"}})
    result = res.get("superposition.features")
    assert result.status == "error" and "has no parameter 'transformer.h.0.mlp.nope.weight'" in result.reason
