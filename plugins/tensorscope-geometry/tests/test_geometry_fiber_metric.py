"""geometry.fiber_bundle and geometry.singularities end to end on a tiny model's embedding, against
the reference pipeline (dense distances, the authors' per-token loop, scipy's BH)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from geometry_fiber_reference import dense_sorted_distances, estimate_stratifications
from tensorscope_geometry.singularities import Singularities, decode
from transformers import AutoModelForCausalLM, AutoTokenizer

from tensorscope_core import RunConfig, analyze
from tensorscope_core.plugin_api import BadParameterError
from tensorscope_core.testing import check_declared_cost, check_roundtrip

FIBER, SING = "geometry.fiber_bundle", "geometry.singularities"
N_DISK = 240
LINE_BOTTOM = range(241, 260)  # the line tokens nearest the disk


def planted_embedding(vocab: int, d: int) -> np.ndarray:
    """A disk of radius 0.5 in dims 0-1 (tokens 0..239) and, above its centre, a line along dim 2 from
    height 0.3 (tokens 240..339): near the disk a line token's neighbourhood turns from 1-D to the
    disk's 2-D as the radius grows, a dimension increase that rejects the fiber-bundle null."""
    rng = np.random.default_rng(0)
    x = np.zeros((vocab, d))
    angle, radius = rng.uniform(0, 2 * np.pi, N_DISK), np.sqrt(rng.uniform(0, 1, N_DISK)) * 0.5
    x[:N_DISK, 0], x[:N_DISK, 1] = radius * np.cos(angle), radius * np.sin(angle)
    x[N_DISK:, 2] = 0.3 + 0.005 * np.arange(vocab - N_DISK) + 1e-4 * rng.normal(size=vocab - N_DISK)
    return x


@pytest.fixture(scope="module")
def planted(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted") / "gpt2"
    model = AutoModelForCausalLM.from_pretrained(models["gpt2"])
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb.copy_(torch.from_numpy(planted_embedding(*emb.shape)))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(models["gpt2"]).save_pretrained(folder)
    return folder, emb.detach().clone()


@pytest.fixture(scope="module")
def result(planted):
    return analyze(planted[0], metrics=[FIBER, SING], config=RunConfig(batch_size=4))


#: the reference loop is slow (scipy's ttest_ind per window): every 24th disk token and the lower line
CHECKED = list(range(0, N_DISK, 24)) + list(range(N_DISK, 266))


@pytest.fixture(scope="module")
def reference(planted):
    points = planted[1].numpy()  # float32 coordinates, distances in float64
    radii = dense_sorted_distances(points)
    rows = {i: estimate_stratifications(radii[i], 10, 100, len(points), nstrat=3) for i in CHECKED}
    manifold_p = {i: min(r["pvalue"]) for i, r in rows.items()}
    fiber_p = {i: min([p for p, a, b in zip(r["pvalue"], r["dimension"], r["dimension"][1:], strict=False)
                             if b > a] or [1.0])
               for i, r in rows.items()}
    return {"radii": radii[:, :100], "rows": rows, "manifold_p": manifold_p, "fiber_p": fiber_p}


def test_fiber_bundle_equals_the_reference_pipeline(result, reference):
    res = result.get(FIBER)
    assert res.ok
    np.testing.assert_allclose(result.tensor(FIBER, "radii").double(), reference["radii"], rtol=1e-6, atol=1e-7)
    dims = result.tensor(FIBER, "dimension").numpy()
    for i, row in reference["rows"].items():
        np.testing.assert_allclose(dims[i, : len(row["dimension"])], row["dimension"], rtol=1e-5)
    for field in ("manifold_p", "fiber_p"):
        got = result.tensor(FIBER, field).numpy()
        np.testing.assert_allclose(got[CHECKED], [reference[field][i] for i in CHECKED], rtol=1e-6, err_msg=field)
        q = result.tensor(FIBER, field.replace("_p", "_q")).numpy()
        np.testing.assert_allclose(q, scipy.stats.false_discovery_control(got), rtol=1e-12)
        flags = result.tensor(FIBER, field.replace("_p", "_rejected")).numpy() > 0
        np.testing.assert_array_equal(flags, q < 1e-3)
    assert res.value("n_manifold_rejected") == (result.tensor(FIBER, "manifold_rejected").numpy() > 0).sum()
    assert res.value("n_tokens") == len(dims) and res.value("n_degenerate") == 0
    check_declared_cost(res)


def test_planted_singularities_are_ranked_and_decoded(result, planted):
    table = result.get(SING).value("tokens")
    rows = [dict(zip(table.columns, row, strict=True)) for row in table.rows]
    tokenizer = AutoTokenizer.from_pretrained(planted[0])
    assert rows and all(r["token"] == tokenizer.decode([r["token_id"]]) for r in rows)
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    qs = [r["manifold_q"] for r in rows]
    assert qs == sorted(qs)
    fiber_ids = {r["token_id"] for r in rows if r["fiber_rejected"]}
    assert set(LINE_BOTTOM) <= fiber_ids  # the planted 1-D -> 2-D transition
    for r in rows:
        if r["fiber_rejected"]:
            dims = [float(d) for d in r["dimensions"].split(" / ")]
            assert any(b > a for a, b in zip(dims, dims[1:], strict=False))


def test_the_top_singularities_are_report_hotspots(result):
    res = result.get(SING)
    readings = Singularities.interpret(res)
    top = res.value("tokens").rows[:3]
    assert [r.where for r in readings] == [f"token {row[1]} {row[2]!r}" for row in top]
    assert all(r.level == "hotspot" and "manifold null" in r.text for r in readings)


def test_decoding_padded_embedding_rows(tokenizer):
    """Rows past the tokenizer's vocabulary (embeddings padded to a round size) have no text."""
    assert decode(tokenizer, 7) == tokenizer.decode([7])
    assert decode(tokenizer, len(tokenizer)) == "" and decode(None, 7) == ""


def test_singularity_summaries_are_fractions_of_the_fiber_result(result):
    sing, fiber = result.get(SING), result.get(FIBER)
    n = fiber.value("n_tokens") - fiber.value("n_degenerate")
    assert sing.value("fraction_manifold_rejected") == pytest.approx(fiber.value("n_manifold_rejected") / n)
    assert sing.value("fraction_fiber_rejected") == pytest.approx(fiber.value("n_fiber_rejected") / n)
    dims = result.tensor(FIBER, "dimension").numpy()[:, 0]
    assert sing.value("median_dimension") == pytest.approx(float(np.median(dims)))
    assert sing.value("dimension_quantiles") == pytest.approx(np.quantile(dims, [0.05, 0.25, 0.5, 0.75, 0.95]))
    frac = sing.values["fraction_manifold_rejected"]
    assert frac.ci_low <= frac.value <= frac.ci_high


def test_roundtrip(result, tmp_path):
    check_roundtrip(result, tmp_path / "saved")


def test_sources_and_translation_invariance(planted, models):
    """GPT-2's unembedding is tied to the embedding; block 0's input is the embedding plus the
    position-0 vector, a translation, so its radii equal the embedding's."""
    res = analyze(planted[0], metrics=[FIBER], params={FIBER: {"source": "resid", "layer": 0, "chunk_size": 50}})
    tied = analyze(planted[0], metrics=[FIBER], params={FIBER: {"source": "unembed"}})
    base = dense_sorted_distances(planted[1].numpy())[:, :100]
    np.testing.assert_allclose(res.tensor(FIBER, "radii").double(), base, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tied.tensor(FIBER, "radii").double(), base, rtol=1e-6, atol=1e-7)
    check_declared_cost(res.get(FIBER))
    assert res.get(FIBER).declared_bytes == 4 * 50 * 340 + 8 * 340 * 100  # follows the chunk size
    llama = AutoModelForCausalLM.from_pretrained(models["llama"])
    out = analyze(models["llama"], metrics=[FIBER], params={FIBER: {"source": "unembed"}})
    want = dense_sorted_distances(llama.get_output_embeddings().weight.detach().numpy())[:, :100]
    np.testing.assert_allclose(out.tensor(FIBER, "radii").double(), want, rtol=1e-6, atol=1e-7)


def test_inapplicable_sources_are_skipped_with_the_fix(models):
    res = analyze(models["gpt2"], metrics=[FIBER, SING], params={FIBER: {"source": "resid"}})
    assert res.get(FIBER).status == "skipped" and "needs layer in 0..2" in res.get(FIBER).reason
    assert res.get(SING).status == "skipped" and FIBER in res.get(SING).reason
    res = analyze(models["gpt2"], metrics=[FIBER], params={FIBER: {"vol_max": 400}})
    assert res.get(FIBER).status == "skipped" and "lower vol_max" in res.get(FIBER).reason


def test_window_that_cannot_detect_is_refused_before_the_run(models):
    with pytest.raises(BadParameterError, match="raise vol_max above 50"):
        analyze(models["gpt2"], metrics=[FIBER], params={FIBER: {"vol_max": 50}})
