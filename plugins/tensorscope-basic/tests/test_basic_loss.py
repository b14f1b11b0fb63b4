"""basic.loss against closed forms and independent reference computations."""

from __future__ import annotations

import math

import pytest
import torch
from basic_reference import (
    ALL,
    CAUSAL,
    causal_loss_own,
    causal_loss_solo,
    load_hf,
    mlm_loss,
    mlm_targets,
    modified_copy,
    tokenize,
)

from tensorscope_core.testing import check_declared_cost, random_token_data, run_metric

METRIC = "basic.loss"


def _zero_unembedding(model: torch.nn.Module) -> None:
    head = model.get_output_embeddings()
    head.weight.zero_()  # GPT-2 and BERT tie it to the input embedding: that is zeroed too
    if getattr(head, "bias", None) is not None:
        head.bias.zero_()
    predictions = getattr(getattr(model, "cls", None), "predictions", None)
    if predictions is not None and getattr(predictions, "bias", None) is not None:
        predictions.bias.zero_()


@pytest.mark.parametrize("family", ALL)
def test_uniform_logits_give_log_vocab(family, models, token_ids, vocab, tmp_path):
    """Closed form: with a zero unembedding every logit is 0, so the loss of every target is
    ln(vocab_size) whatever the input, and the perplexity is vocab_size."""
    folder = modified_copy(models[family], tmp_path / "zero-head", family, _zero_unembedding)
    result = run_metric(METRIC, folder, token_ids)
    assert result.value("loss") == pytest.approx(math.log(vocab), abs=1e-6)
    assert result.value("perplexity") == pytest.approx(vocab, rel=1e-6)
    check_declared_cost(result)


@pytest.mark.parametrize("family", CAUSAL)
def test_uniform_logits_from_module(family, models, token_ids, vocab):
    """The same closed form with the nn.Module passed directly (no save/reload)."""
    model = load_hf(models[family], family)
    with torch.no_grad():
        _zero_unembedding(model)
    result = run_metric(METRIC, model, token_ids)
    assert result.value("loss") == pytest.approx(math.log(vocab), abs=1e-6)


@pytest.mark.parametrize("family", CAUSAL)
def test_unpadded_equals_models_own_loss(family, models, token_ids):
    """Reference: the model's own ``model(ids, labels=ids).loss`` per batch, token-weighted."""
    result = run_metric(METRIC, models[family], token_ids)
    want = causal_loss_own(load_hf(models[family], family), token_ids)
    assert result.value("loss") == pytest.approx(want, rel=1e-6)
    assert result.value("perplexity") == pytest.approx(math.exp(want), rel=1e-6)
    assert result.values["loss"].n == 8 * 15  # 8 sequences of 16 tokens: 15 targets each
    check_declared_cost(result)


@pytest.mark.parametrize("family", CAUSAL)
def test_padding_is_excluded(family, models, texts, tokenizer):
    """Padded batches of variable-length texts equal each text run alone, without any padding,
    with the per-token cross-entropy written out in float64."""
    result = run_metric(METRIC, models[family], texts)
    rows = tokenize(tokenizer, texts)
    assert len({len(r) for r in rows}) > 3  # really variable lengths
    want, n_targets = causal_loss_solo(load_hf(models[family], family), rows)
    assert result.values["loss"].n == n_targets
    assert result.value("loss") == pytest.approx(want, rel=1e-5)
    check_declared_cost(result)


@pytest.mark.parametrize("family", CAUSAL)
def test_ci_contains_value_and_narrows(family, models, vocab):
    small = run_metric(METRIC, models[family], random_token_data(vocab, n=8, length=16, seed=3)).values["loss"]
    large = run_metric(METRIC, models[family], random_token_data(vocab, n=64, length=16, seed=3)).values["loss"]
    for v in (small, large):
        assert v.ci_low is not None and v.ci_high is not None
        assert v.ci_low < v.value < v.ci_high
    # 8x the sequences: the width should shrink by about sqrt(8) = 2.8
    assert (large.ci_high - large.ci_low) < (small.ci_high - small.ci_low) / 1.5


@pytest.mark.parametrize("family", CAUSAL)
def test_named_tasks_equal_separate_runs(family, models, vocab):
    a = random_token_data(vocab, n=8, length=16, seed=11)
    b = random_token_data(vocab, n=4, length=10, seed=12)
    both = run_metric(METRIC, models[family], {"a": a, "b": b})
    alone_a = run_metric(METRIC, models[family], a)
    alone_b = run_metric(METRIC, models[family], b)
    assert both.value("loss/a") == pytest.approx(alone_a.value("loss"), rel=1e-6)
    assert both.value("loss/b") == pytest.approx(alone_b.value("loss"), rel=1e-6)
    assert both.values["loss/a"].n == 8 * 15 and both.values["loss/b"].n == 4 * 9
    # the overall loss is the token-weighted mean of the two tasks
    pooled = (alone_a.value("loss") * 120 + alone_b.value("loss") * 36) / 156
    assert both.value("loss") == pytest.approx(pooled, rel=1e-6)
    check_declared_cost(both)


def test_bert_masked_lm_loss(models, token_ids, tokenizer):
    """BERT: cross-entropy on the core's seeded 15% mask, written out by hand in float64."""
    result = run_metric(METRIC, models["bert"], token_ids)
    mask_id = tokenizer.mask_token_id
    want, n_targets = mlm_loss(load_hf(models["bert"], "bert"), token_ids, mask_id)
    assert math.isfinite(result.value("loss"))
    assert result.values["loss"].n == n_targets
    assert result.value("loss") == pytest.approx(want, rel=1e-5)
    check_declared_cost(result)


def test_bert_mask_is_seeded_and_on_real_tokens(token_ids, tokenizer):
    """The mask the reference shares with the run: real tokens only, at least one per
    sequence, replaced by [MASK], and the same for the same seed and batch."""
    ids = token_ids[:4].clone()
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0  # a padded row: its padding must never be a target
    t1 = mlm_targets(ids, mask, 0, tokenizer.mask_token_id)
    t2 = mlm_targets(ids, mask, 0, tokenizer.mask_token_id)
    chosen = t1.target_mask.bool()
    assert torch.equal(t1.target_mask, t2.target_mask)
    assert not (chosen & (mask == 0)).any()
    assert chosen.any(dim=1).all()
    assert torch.equal(t1.model_input == tokenizer.mask_token_id, chosen)
