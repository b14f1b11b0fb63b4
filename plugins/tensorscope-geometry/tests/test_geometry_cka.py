"""geometry.cka / rsa / cka_across / rsa_across: spec numbers, invariances, references on real models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from geometry_activations_reference import activations, stacked
from geometry_cka_reference import feature_cka, gram_cka, minibatch_cka, rsa
from tensorscope_geometry.kernels import centred_gram, correlation_matrix, rdm_ranks, spearman_matrix
from tensorscope_geometry.similarity import Terms, check_aligned, cka_fields, rsa_mean

from tensorscope_core import RunConfig, analyze
from tensorscope_core.testing import check_declared_cost, check_roundtrip, run_metric, tiny_model

X6 = [[1, 0], [0, 1], [1, 1], [2, 0], [0, 3], [1, 2]]
Y6 = [[1], [0], [2], [1], [3], [0]]
ALL = {"examples_per_batch": 4096}  # keep every token of a batch


def make_terms(batches: list[list[np.ndarray]]) -> Terms:
    """Terms of batches given as per-layer arrays [n_b, p_l] (the layers of a batch share n_b)."""
    m = max(b[0].shape[0] for b in batches)
    shape = (len(batches), len(batches[0]), m, m)
    grams, corr = torch.zeros(shape, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64)
    for b, layers in enumerate(batches):
        for layer, x in enumerate(layers):
            n = x.shape[0]
            grams[b, layer, :n, :n] = centred_gram(torch.as_tensor(x, dtype=torch.float64))
            corr[b, layer, :n, :n] = correlation_matrix(torch.as_tensor(x, dtype=torch.float64))
    return Terms(grams, corr, torch.full((len(batches), m), -1), [b[0].shape[0] for b in batches])


def cka_of(x, y, fraction=0.0):
    f = cka_fields(*(2 * [make_terms([[np.asarray(x, float), np.asarray(y, float)]])]), fraction)
    return f


def test_one_dimensional_cka_is_pearson_r_squared():
    f = cka_of([[1], [2], [3], [4]], [[1], [3], [2], [4]])
    assert float(f["linear"][0, 1]) == pytest.approx(0.64, abs=1e-12)


def test_spec_example_linear_and_debiased():
    f = cka_of(X6, Y6)
    assert float(f["linear"][0, 1]) == pytest.approx(0.151721, abs=5e-7)
    assert float(f["debiased"][0, 1]) == pytest.approx(-0.384926, abs=5e-7)
    x, y = np.asarray(X6, float), np.asarray(Y6, float)
    # the two debiased forms of the reference (Gram with unbiased centring; feature space) agree with ours
    assert gram_cka(x, y, debiased=True) == pytest.approx(float(f["debiased"][0, 1]), abs=1e-12)
    assert feature_cka(x, y, debiased=True) == pytest.approx(float(f["debiased"][0, 1]), abs=1e-12)
    assert feature_cka(x, y) == pytest.approx(float(f["linear"][0, 1]), abs=1e-12)


def test_debiased_forms_agree_on_random_data():
    gen = np.random.default_rng(0)
    x, y = gen.normal(size=(30, 7)) + 3.0, gen.normal(size=(30, 4))
    y[:, 0] += x[:, 0]
    ours = cka_of(x, y)
    assert float(ours["debiased"][0, 1]) == pytest.approx(feature_cka(x, y, debiased=True), rel=1e-10)
    assert float(ours["debiased"][0, 1]) == pytest.approx(gram_cka(x, y, debiased=True), rel=1e-10)
    assert float(ours["linear"][0, 1]) == pytest.approx(gram_cka(x, y), rel=1e-10)


@pytest.mark.parametrize("kind", ["linear", "debiased"])
def test_invariances(kind):
    """CKA(X, a X Q + b) = 1, and CKA(X, Y) = CKA(a X Q + b, Y) for orthogonal Q, a != 0, any b."""
    gen = np.random.default_rng(1)
    x, y = gen.normal(size=(25, 6)), gen.normal(size=(25, 3))
    y[:, 1] += x[:, 2]
    q, _ = np.linalg.qr(gen.normal(size=(6, 6)))
    moved = -2.5 * x @ q + gen.normal(size=6) * 10
    assert float(cka_of(x, moved)[kind][0, 1]) == pytest.approx(1.0, abs=1e-10)
    assert float(cka_of(moved, y)[kind][0, 1]) == pytest.approx(float(cka_of(x, y)[kind][0, 1]), abs=1e-10)


def test_minibatch_sums_match_the_reference_estimator():
    gen = np.random.default_rng(2)
    batches = [(gen.normal(size=(n, 5)), gen.normal(size=(n, 3))) for n in (9, 4, 12)]
    for x, y in batches:
        y[:, 0] += x[:, 0]
    f = cka_fields(*(2 * [make_terms([list(b) for b in batches])]), 0.0)
    assert float(f["linear"][0, 1]) == pytest.approx(minibatch_cka(batches), rel=1e-10)
    assert float(f["debiased"][0, 1]) == pytest.approx(minibatch_cka(batches, debiased=True), rel=1e-10)


def test_trimmed_cka_equals_cka_without_the_outlier():
    gen = np.random.default_rng(3)
    x = gen.normal(size=(40, 3))
    y = x @ gen.normal(size=(3, 2)) + 0.5 * gen.normal(size=(40, 2))
    x[7] *= 60.0  # one far outlier
    f = cka_of(x, y, fraction=1 / 40)  # ceil(1/40 * 40) = 1 example dropped
    keep = np.arange(40) != 7
    assert float(f["linear_trimmed"][0, 1]) == pytest.approx(gram_cka(x[keep], y[keep]), rel=1e-10)
    assert float(f["debiased_trimmed"][0, 1]) == pytest.approx(gram_cka(x[keep], y[keep], True), rel=1e-10)
    assert f["linear_outlier_change"].value == pytest.approx(
        abs(gram_cka(x, y) - gram_cka(x[keep], y[keep])), rel=1e-9)


def test_outlier_warning_for_reports():
    from tensorscope_geometry.similarity import CKA

    from tensorscope_core import MetricResult, ScalarValue

    def result(change):
        return MetricResult(metric="geometry.cka", version="1", plugin="g", status="ok", values={
            "linear_outlier_change": ScalarValue(value=change), "debiased_outlier_change": ScalarValue(value=0.0)})
    assert CKA.interpret(result(0.1)) == []
    [warning] = CKA.interpret(result(0.3))
    assert warning.level == "warning" and "0.30" in warning.text


def test_rsa_self_and_monotone_transform():
    gen = np.random.default_rng(4)
    x = gen.normal(size=(12, 5))
    corr = correlation_matrix(torch.as_tensor(x))[None]
    assert spearman_matrix(rdm_ranks(corr), rdm_ranks(corr))[0, 0] == pytest.approx(1.0, abs=1e-12)
    monotone = 1.0 - (1.0 - corr).pow(3)  # RDM -> RDM^3: same order
    assert spearman_matrix(rdm_ranks(corr), rdm_ranks(monotone))[0, 0] == pytest.approx(1.0, abs=1e-12)
    y = gen.normal(size=(12, 4))
    terms = make_terms([[x, y]])
    assert rsa_mean(terms, terms)[0][0, 1] == pytest.approx(rsa(x, y), abs=1e-12)


def test_alignment_is_checked():
    a = make_terms([[np.ones((4, 2)) + np.eye(4, 2)]])
    b = Terms(a.grams, a.correlations, a.examples + 1, a.sizes)
    with pytest.raises(ValueError, match="saw different examples"):
        check_aligned(["a", "b"], [a, b])


# -- end to end ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ragged(tokenizer):
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(4, len(tokenizer), (n,), generator=gen) for n in (9, 16, 5, 12, 16, 6, 8)]


@pytest.fixture(scope="module")
def hooked(models, ragged):
    return {family: activations(models[family], ragged)[0] for family in ("gpt2", "llama")}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_batch_equals_full_data_cka_and_rsa(family, models, ragged, hooked):
    res = analyze(models[family], data=ragged, metrics=["geometry.cka", "geometry.rsa"],
                  params={"geometry.similarity_terms": ALL}, config=RunConfig(batch_size=8))
    layers = [x.numpy() for x in stacked(hooked[family], range(len(ragged)))]
    linear, debiased = res.tensor("geometry.cka", "linear"), res.tensor("geometry.cka", "debiased")
    rsa_matrix = res.tensor("geometry.rsa", "rsa")
    for i, xi in enumerate(layers):
        for j, xj in enumerate(layers):
            assert float(linear[i, j]) == pytest.approx(gram_cka(xi, xj), rel=1e-5)
            assert float(debiased[i, j]) == pytest.approx(feature_cka(xi, xj, debiased=True), rel=1e-5, abs=1e-6)
            assert float(rsa_matrix[i, j]) == pytest.approx(rsa(xi, xj), rel=1e-5)
    assert torch.allclose(linear.diagonal(), torch.ones(len(layers), dtype=torch.float64), atol=1e-12)
    assert torch.allclose(debiased.diagonal(), torch.ones(len(layers), dtype=torch.float64), atol=1e-12)
    assert torch.allclose(rsa_matrix.diagonal(), torch.ones(len(layers), dtype=torch.float64), atol=1e-12)
    assert res.get("geometry.cka").value("adjacent_linear") == pytest.approx(
        [float(linear[i, i + 1]) for i in range(len(layers) - 1)])
    check_declared_cost(res.get("geometry.similarity_terms"))


def test_bert_encoder(tmp_path):
    """An encoder without a mask token (its input is the batch itself), one batch, against hooks."""
    folder = tiny_model("bert", tmp_path / "bert", with_tokenizer=False)
    gen = torch.Generator().manual_seed(4)
    rows = [torch.randint(4, 64, (n,), generator=gen) for n in (7, 12, 5, 10)]
    result = run_metric("geometry.cka", folder, rows, params={"outlier_fraction": 0.0}, batch_size=4)
    layers = [x.numpy() for x in stacked(activations(folder, rows)[0], range(4))]
    want = [[gram_cka(a, b) for b in layers] for a in layers]
    assert result.values["linear"].shape == [3, 3]
    assert result.value("adjacent_linear") == pytest.approx([want[0][1], want[1][2]], rel=1e-5)
    assert result.value("linear_outlier_change") == 0.0
    check_declared_cost(result)


def test_several_batches_match_the_reference_minibatch_estimator(models, ragged, hooked, tmp_path):
    res = analyze(models["gpt2"], data=ragged, metrics=["geometry.cka", "geometry.rsa"],
                  params={"geometry.similarity_terms": ALL}, config=RunConfig(batch_size=3))
    groups = [range(0, 3), range(3, 6), range(6, 7)]
    per_batch = [[x.numpy() for x in stacked(hooked["gpt2"], g)] for g in groups]
    linear, debiased = res.tensor("geometry.cka", "linear"), res.tensor("geometry.cka", "debiased")
    rsa_matrix = res.tensor("geometry.rsa", "rsa")
    for i in range(3):
        for j in range(3):
            pairs = [(b[i], b[j]) for b in per_batch]
            assert float(linear[i, j]) == pytest.approx(minibatch_cka(pairs), rel=1e-5)
            assert float(debiased[i, j]) == pytest.approx(minibatch_cka(pairs, debiased=True), rel=1e-5)
            assert float(rsa_matrix[i, j]) == pytest.approx(np.mean([rsa(x, y) for x, y in pairs]), rel=1e-5)
    terms = res.get("geometry.similarity_terms")
    assert terms.value("sizes") == [30, 34, 8]
    check_declared_cost(terms)
    check_roundtrip(res, tmp_path / "out")


def test_subsampled_examples_are_the_same_tokens_on_every_model(models, ragged):
    res = analyze({"gpt2": models["gpt2"], "llama": models["llama"]}, data=ragged,
                  metrics=["geometry.similarity_terms"],
                  params={"geometry.similarity_terms": {"examples_per_batch": 10}},
                  config=RunConfig(batch_size=3))
    a = res.tensor("geometry.similarity_terms", "examples", model="gpt2")
    b = res.tensor("geometry.similarity_terms", "examples", model="llama")
    assert torch.equal(a, b)  # the same 10 token ids per batch (the last batch has only 8 tokens)
    assert res.get("geometry.similarity_terms", model="gpt2").value("sizes") == [10, 10, 8]
    assert (a[2, 8:] == -1).all() and (a[:, :8] >= 4).all()
    assert {int(t) for t in a[a >= 0]} <= {int(t) for row in ragged for t in row}


def test_cka_across_models(models, ragged, hooked):
    res = analyze({"gpt2": models["gpt2"], "llama": models["llama"]}, data=ragged,
                  metrics=["geometry.cka_across", "geometry.rsa_across"],
                  params={"geometry.similarity_terms": ALL}, config=RunConfig(batch_size=4))
    groups = [range(0, 4), range(4, 7)]
    per_batch = {f: [[x.numpy() for x in stacked(hooked[f], g)] for g in groups] for f in ("gpt2", "llama")}
    cka = res.get("geometry.cka_across")
    assert cka.ok, cka.reason
    for row in cka.values["pairs"].rows:
        _, _, la, lb, linear, debiased, _, _ = row
        pairs = [(x[la], y[lb]) for x, y in zip(per_batch["gpt2"], per_batch["llama"], strict=True)]
        assert linear == pytest.approx(minibatch_cka(pairs), rel=1e-5)
        assert debiased == pytest.approx(minibatch_cka(pairs, debiased=True), rel=1e-5)
    same = res.tensor("geometry.cka_across", "same_layer_linear")
    assert same.shape == (2, 2, 3)
    assert torch.allclose(same[0, 0], torch.ones(3, dtype=torch.float64), atol=1e-12)
    rows = {(r[2], r[3]): r[4] for r in cka.values["pairs"].rows}
    assert float(same[0, 1, 2]) == pytest.approx(rows[2, 2])
    rsa_rows = res.get("geometry.rsa_across").values["pairs"].rows
    assert rsa_rows[0][4] == pytest.approx(np.mean([rsa(x[0], y[0]) for x, y in zip(
        per_batch["gpt2"], per_batch["llama"], strict=True)]), rel=1e-5)


def test_a_model_against_itself_is_one_per_layer(models, ragged):
    res = analyze({"a": models["gpt2"], "b": models["gpt2"]}, data=ragged,
                  metrics=["geometry.cka_across", "geometry.rsa_across", "geometry.cka"],
                  config=RunConfig(batch_size=4))
    for field in ("same_layer_linear", "same_layer_debiased"):
        same = res.tensor("geometry.cka_across", field)
        assert torch.allclose(same, torch.ones_like(same), atol=1e-12)
    assert torch.allclose(res.tensor("geometry.rsa_across", "same_layer"), torch.ones(2, 2, 3, dtype=torch.float64),
                          atol=1e-12)
    within = res.tensor("geometry.cka", "linear", model="a")
    for row in res.get("geometry.cka_across").values["pairs"].rows:
        assert row[4] == pytest.approx(float(within[row[2], row[3]]), abs=1e-12)


def test_models_of_different_depth(models, ragged, tmp_path):
    deeper = tiny_model("llama", tmp_path / "llama3", n_layers=3)
    res = analyze({"gpt2": models["gpt2"], "llama3": deeper}, data=ragged, metrics=["geometry.cka_across"],
                  config=RunConfig(batch_size=4))
    result = res.get("geometry.cka_across")
    assert result.ok, result.reason
    assert sorted({(r[2], r[3]) for r in result.values["pairs"].rows}) == [(a, b) for a in range(3) for b in range(4)]
    assert "same_layer_linear" not in result.values  # layer l against layer l needs equal depths


def test_one_model_and_too_small_batches_are_skipped(models, ragged):
    res = analyze(models["gpt2"], data=ragged, metrics=["geometry.cka_across"])
    assert res.get("geometry.cka_across").status == "skipped"
    assert "at least two" in res.get("geometry.cka_across").reason
    res = analyze(models["gpt2"], data=ragged, metrics=["geometry.cka"],
                  params={"geometry.similarity_terms": {"unit": "sequence"}}, config=RunConfig(batch_size=2))
    assert res.get("geometry.similarity_terms").status == "skipped"
    assert "batch_size" in res.get("geometry.similarity_terms").reason
    assert res.get("geometry.cka").status == "skipped"


def test_sequence_unit_uses_mean_pooled_sequences(models, ragged, hooked):
    res = analyze(models["gpt2"], data=ragged, metrics=["geometry.cka"],
                  params={"geometry.similarity_terms": {"unit": "sequence"}}, config=RunConfig(batch_size=8))
    pooled = [np.stack([hooked["gpt2"][s][layer].mean(0).numpy() for s in range(len(ragged))]) for layer in range(3)]
    linear = res.tensor("geometry.cka", "linear")
    assert float(linear[0, 2]) == pytest.approx(gram_cka(pooled[0], pooled[2]), rel=1e-5)
    assert torch.equal(res.tensor("geometry.similarity_terms", "examples")[0], torch.tensor([0, 1, 2, 3, 4, 5, 6, -1]))
