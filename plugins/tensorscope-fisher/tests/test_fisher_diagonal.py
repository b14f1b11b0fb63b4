"""fisher.diagonal and its artifact against a float64 brute force, a closed form and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fisher_diagonal_reference import example_squares, load_causal, summary
from tensorscope_fisher.diagonal import FisherDiagonal, Welford

from tensorscope_core import RunConfig, analyze, plan
from tensorscope_core.testing import check_declared_cost, check_roundtrip, random_token_data, run_metric

CONFIG = RunConfig(batch_size=4, max_length=32, dtype="float64")
DECAY = 0.9


def _rows(vocab: int, lengths: list[int], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=gen) for n in lengths]


@pytest.fixture(scope="module")
def tasked(models):
    """Two tasks of rows with different lengths (padded batches): a = 6 rows (batches 4 + 2), b = 4."""
    vocab = load_causal(models["gpt2"]).config.vocab_size
    return {"a": _rows(vocab, [9, 5, 12, 7, 3, 10], 1), "b": _rows(vocab, [6, 11, 8, 4], 2)}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_matches_single_example_backward_passes(family, models, tasked, tmp_path):
    """Every field (pooled and per task) against one backward pass per example, numpy's mean and
    ddof-1 variance, scipy's t interval and the EMA recursion, float64."""
    res = analyze(models[family], data=tasked, metrics=["fisher.diagonal"],
                  params={"fisher.diagonal": {"ema_decay": DECAY}}, config=CONFIG)
    result = res.get("fisher.diagonal")
    assert result.ok, result.reason
    model = load_causal(models[family])
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    batches = [(tasked["a"][:4], "a", 0), (tasked["a"][4:], "a", 1), (tasked["b"], "b", 0)]
    # GPT-2: each row alone without padding; LLaMA: alone but padded to its batch's width (its
    # float32 rotary angles make a padded row differ from the unpadded one by ~1e-8 relative)
    per_batch = example_squares(model, batches, padded=family == "llama")
    rtol = 1e-9
    for kind, k in (("true", 1), ("empirical", 2)):
        for seg, chosen in (("", per_batch), ("a/", per_batch[:2]), ("b/", per_batch[2:])):
            want = summary([b[k] for b in chosen], DECAY)
            for label, key in ((kind, "mean"), (f"{kind}_var", "var"), (f"{kind}_ci_low", "low"),
                               (f"{kind}_ci_high", "high"), (f"{kind}_ema", "ema")):
                got = torch.cat([res.tensor("fisher.diagonal", f"{label}/{seg}{n}").reshape(-1) for n in names])
                np.testing.assert_allclose(got.numpy(), want[key], rtol=rtol, atol=1e-12 * want["mean"].max(),
                                           err_msg=f"{label}/{seg}")
            trace = result.values[f"{kind}_trace" + (f"/{seg[:-1]}" if seg else "")]
            assert trace.value == pytest.approx(want["trace"], rel=rtol)
            assert trace.ci_low == pytest.approx(want["trace_low"], rel=rtol)
        assert res.tensor("fisher.diagonal", f"{kind}/{names[0]}").shape == shapes[0]
    assert result.value("n_examples") == 10 and result.value("n_examples/a") == 6
    check_declared_cost(result)
    check_roundtrip(res, tmp_path / "out")


def test_empirical_unembedding_closed_form(models):
    """LLaMA's untied lm_head W [V, d] reads the final-norm output h_t: the gradient of an example's
    summed NLL is sum_t (p_t - e_{y_t}) h_t^T, so its empirical Fisher diagonal is the mean over
    examples of (sum_t (p_tv - [v = y_t]) h_tj)^2, from the model's own logits and hidden states."""
    model = load_causal(models["llama"])
    ids = random_token_data(model.config.vocab_size, n=6, length=9, seed=3)  # unpadded
    res = analyze(models["llama"], data=ids, metrics=["fisher.diagonal"], config=CONFIG)
    got = res.tensor("fisher.diagonal", "empirical/lm_head.weight")
    squares = []
    with torch.no_grad():
        for row in ids:
            out = model(input_ids=row[None], output_hidden_states=True)
            h = out.hidden_states[-1][0, :-1]  # transformers applies the final norm to the last entry
            p = torch.softmax(out.logits[0, :-1], dim=-1)
            p[torch.arange(len(row) - 1), row[1:]] -= 1
            squares.append((p.T @ h).pow(2))
    torch.testing.assert_close(got, torch.stack(squares).mean(0), rtol=1e-9, atol=1e-15)


def test_true_unembedding_expectation(models):
    """With one target per example (2-token sequences) and the drawn label y, the lm_head gradient
    is (p - e_y) h^T, so summed over the vocabulary row v its square is h_j^2 (1 - 2 p_y + sum_v p_v^2),
    whose expectation over y ~ p is h_j^2 (1 - sum_v p_v^2) with variance h_j^4 4 (sum p^3 - (sum p^2)^2).
    Over 192 distinct contexts every column's reported sum lies within 4 of those standard errors
    of the closed form (the draws' distribution itself: test_draws_follow_the_softmax)."""
    model = load_causal(models["llama"])
    ids = random_token_data(model.config.vocab_size, n=192, length=2, seed=5)
    assert len({tuple(r.tolist()) for r in ids}) == 192
    res = analyze(models["llama"], data=ids, metrics=["fisher.diagonal"],
                  config=RunConfig(batch_size=64, dtype="float64"))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    h2 = out.hidden_states[-1][:, 0].pow(2)  # [n, d]
    p = torch.softmax(out.logits[:, 0], dim=-1)  # [n, V]
    s2, s3 = p.pow(2).sum(1), p.pow(3).sum(1)
    expected = (h2 * (1 - s2)[:, None]).mean(0)
    se = (h2.pow(2) * (4 * (s3 - s2.pow(2)))[:, None]).sum(0).sqrt() / len(ids)
    z = (res.tensor("fisher.diagonal", "true/lm_head.weight").sum(0) - expected) / se
    assert float(z.abs().max()) < 4


def test_draws_follow_the_softmax():
    """Chi-square goodness of fit of 4000 draws (distinct rows, so distinct generators) to p."""
    from scipy import stats

    from tensorscope_core import Batch
    from tensorscope_core.plugin_api import draw_labels

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5], dtype=torch.float64)
    ids = torch.arange(4000)[:, None] + 10
    batch = Batch(ids, torch.ones_like(ids), None, 0, 0)
    drawn = draw_labels(logits.expand(4000, 1, 5), batch, ids, seed=0)[:, 0]
    counts = torch.bincount(drawn, minlength=5).double()
    expected = torch.softmax(logits, 0) * 4000
    assert stats.chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3
    again = draw_labels(logits.expand(4000, 1, 5), batch, ids, seed=0)[:, 0]
    other = draw_labels(logits.expand(4000, 1, 5), batch, ids, seed=1)[:, 0]
    assert torch.equal(drawn, again) and not torch.equal(drawn, other)


def test_micro_batches_do_not_change_the_draws(models, tasked):
    """A budget that forces smaller micro-batches gives the same numbers (labels are seeded per row).
    The mean only: its finalize holds less than the pass, so the pass sets the peak."""
    params = {"fisher.diagonal": {"statistics": "mean"}}
    full = plan(models["gpt2"], data=tasked["a"], metrics=["fisher.diagonal"], config=CONFIG, params=params)[0]
    fields = []
    for budget in (full.peak_bytes, full.peak_bytes - 1):
        cfg = RunConfig(batch_size=4, max_length=32, dtype="float64", memory_budget=budget)
        assert plan(models["gpt2"], data=tasked["a"], metrics=["fisher.diagonal"], config=cfg,
                    params=params)[0].micro_batch == (4 if budget == full.peak_bytes else 2)
        res = analyze(models["gpt2"], data=tasked["a"], metrics=["fisher.diagonal"], config=cfg, params=params)
        fields.append(res.tensor("fisher.diagonal", "true/transformer.h.0.attn.c_attn.weight"))
    torch.testing.assert_close(fields[0], fields[1], rtol=1e-10, atol=0)


def test_masked_lm_encoder_loop_fallback(models):
    """BERT: the artifact loops over examples (vmap cannot run the bidirectional mask); the
    empirical Fisher of the masked-position loss is finite and nonzero, the true one too."""
    res = analyze(models["bert"], data=["the cat sat on the mat", "a dog ran far away from home"],
                  metrics=["fisher.diagonal"], config=RunConfig(batch_size=2))
    result = res.get("fisher.diagonal")
    assert result.ok, result.reason
    word = res.tensor("fisher.diagonal", "empirical/bert.embeddings.word_embeddings.weight")
    assert torch.isfinite(word).all() and float(word.sum()) > 0
    assert result.value("true_trace") > 0


def test_welford_merges_uneven_batches_like_numpy():
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.rand(n, 5, generator=gen, dtype=torch.float64) * 10 for n in (1, 4, 0, 7, 2)]
    acc = Welford(5)
    ema = None
    for c in chunks:
        acc.add(c, 0.8)
        if len(c):
            ema = c.mean(0) if ema is None else 0.8 * ema + 0.2 * c.mean(0)
    x = torch.cat(chunks).numpy()
    np.testing.assert_allclose(acc.mean.numpy(), x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(acc.variance().numpy(), x.var(0, ddof=1), rtol=1e-12)
    torch.testing.assert_close(acc.ema, ema, rtol=1e-14, atol=0)
    assert float(acc.count) == 14
    one = Welford(2)
    one.add(torch.ones(1, 2, dtype=torch.float64), 0.5)
    assert torch.isnan(one.variance()).all() and torch.isnan(one.interval(0.95)[0]).all()


def test_welford_mean_and_ema_closed_forms():
    """Hand series of 4 batches: the Welford mean is the plain mean of all rows (unequal batch sizes), the
    EMA is β³ m_1 + (1 - β)(β² m_2 + β m_3 + m_4) of the batch means m_b."""
    beta = 0.9
    batches = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0], [5.0, 0.0]]),
               torch.tensor([[0.0, 4.0], [2.0, 2.0], [1.0, 1.0]]), torch.tensor([[7.0, 7.0]])]
    acc = Welford(2)
    for b in batches:
        acc.add(b.double(), beta)
    every = torch.cat(batches).double()
    torch.testing.assert_close(acc.mean, every.mean(0), rtol=1e-15, atol=0)
    m = [b.double().mean(0) for b in batches]
    closed = beta**3 * m[0] + (1 - beta) * (beta**2 * m[1] + beta * m[2] + m[3])
    torch.testing.assert_close(acc.ema, closed, rtol=1e-14, atol=0)
    torch.testing.assert_close(acc.variance(), every.var(0), rtol=1e-14, atol=0)


def test_interpret_says_which_estimate_for_which_purpose(models):
    result = run_metric("fisher.diagonal", models["gpt2"], random_token_data(300, n=4, length=6),
                        params={"ema_decay": 0.9, "per_task": False})
    (reading,) = FisherDiagonal.interpret(result)
    assert "importance masks" in reading.text and "window 1/(1 - decay) = 10 batches" in reading.text


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_mean_in_float32_sums_squares_in_the_artifact(models, tasked, family):
    """The mean alone in float32 (the ladder's ``mean-only`` rung) asks the artifact for squares summed over
    each batch, not rows: every field, per task too, and the trace with its interval, equal the float64
    rows' to float32 rounding (BERT: rows without a masked token add nothing and are not counted), and the
    plan declares a float32 vector per label set instead of the batch's rows."""
    data = tasked if family != "bert" else {"a": ["the cat sat on the mat", "a dog ran far away from home",
                                                  "one two three", "birds sing in the morning light"]}
    config = RunConfig(batch_size=4, max_length=32, dtype="float32")
    mean = {"fisher.diagonal": {"statistics": "mean", "dtype": "float32"}}
    exact = {"fisher.diagonal": {"statistics": "mean", "dtype": "float64"}}
    summed = analyze(models[family], data=data, metrics=["fisher.diagonal"], config=config, params=mean)
    rows = analyze(models[family], data=data, metrics=["fisher.diagonal"], config=config, params=exact)
    a, b = summed.get("fisher.diagonal"), rows.get("fisher.diagonal")
    assert a.ok and b.ok and set(a.values) == set(b.values)
    for field, value in a.values.items():
        if value.kind == "tensor":
            want = rows.tensor("fisher.diagonal", field)
            torch.testing.assert_close(summed.tensor("fisher.diagonal", field).double(), want,
                                       rtol=1e-5, atol=1e-6 * float(want.abs().max()))
        elif value.kind == "scalar":
            assert a.value(field) == pytest.approx(b.value(field), rel=1e-6), field
    (by_sum,) = plan(models[family], data=data, metrics=["fisher.diagonal"], config=config, params=mean)
    (by_rows,) = plan(models[family], data=data, metrics=["fisher.diagonal"], config=config, params=exact)
    size = sum(p.numel() for p in load_causal(models[family]).parameters() if p.requires_grad) \
        if family != "bert" else None
    artifacts = [sum(p.artifact_bytes for p in x.passes) for x in (by_sum, by_rows)]
    assert artifacts[0] < artifacts[1]
    if size is not None:  # two label sets: [P] float32 each against [4, P] float32 rows each
        assert artifacts[1] - artifacts[0] == 2 * (4 * size * 4 - (size * 4 + 4 * 8))
