"""basic.grad_norms against backward passes of the model's own loss, written out by hand."""

from __future__ import annotations

import pytest
import torch
from basic_reference import ALL, BATCH_SIZE, CAUSAL, MAX_LENGTH, batches, grad_norms, load_hf, tokenize

from tensorscope_core import RunConfig, analyze, plan
from tensorscope_core.testing import check_declared_cost, run_metric

METRIC = "basic.grad_norms"


def _assert_matches(result, want: dict[str, object], rtol: float = 1e-5) -> None:
    torch.testing.assert_close(torch.tensor(result.value("layer_norm"), dtype=torch.float64),
                               torch.tensor(want["layer_norm"], dtype=torch.float64), rtol=rtol, atol=0)
    assert result.value("outside_norm") == pytest.approx(want["outside_norm"], rel=rtol)
    assert result.value("total_norm") == pytest.approx(want["total_norm"], rel=rtol)


@pytest.mark.parametrize("family", ALL)
def test_unpadded_equals_reference(family, models, token_ids, tokenizer):
    """Reference: per batch, backward of ``model(ids, labels=...).loss`` (the mean over the
    batch's targets; BERT: the seeded masked positions), block/outside/total gradient norms
    in float64, averaged over the batches."""
    result = run_metric(METRIC, models[family], token_ids)
    want = grad_norms(load_hf(models[family], family), family, batches(list(token_ids)),
                      tokenizer.mask_token_id)
    _assert_matches(result, want)
    total = result.values["total_norm"]
    assert total.n == 2
    assert total.ci_low <= total.value <= total.ci_high
    assert total.ci_low == pytest.approx(min(want["per_batch_total"]), rel=1e-5)
    assert total.ci_high == pytest.approx(max(want["per_batch_total"]), rel=1e-5)
    check_declared_cost(result)


@pytest.mark.parametrize("family", CAUSAL)
def test_padded_equals_reference(family, models, texts, tokenizer):
    """Padded texts: the reference labels padding -100, so it is no target of the mean loss."""
    result = run_metric(METRIC, models[family], texts)
    want = grad_norms(load_hf(models[family], family), family, batches(tokenize(tokenizer, texts)))
    _assert_matches(result, want)
    check_declared_cost(result)


def _run_counting_rows(module, texts, tokenizer, **config):
    """Run the metric on ``module`` and record the rows of every forward the run makes."""
    rows: list[int] = []
    hook = module.register_forward_pre_hook(
        lambda mod, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        res = analyze(module, data=texts, metrics=[METRIC], tokenizer=tokenizer,
                      config=RunConfig(batch_size=BATCH_SIZE, max_length=MAX_LENGTH, **config))
    finally:
        hook.remove()
    result = res.get(METRIC)
    assert result.status == "ok", result.reason
    return result, rows


@pytest.mark.parametrize("family", CAUSAL)
def test_micro_batching_gives_the_same_numbers(family, models, texts, tokenizer):
    """A memory budget that only fits micro-batch 1: one forward/backward per sequence (with
    different numbers of real tokens) whose gradients sum to the batch mean -- the same norms
    as whole batches of 4."""
    base = {"batch_size": BATCH_SIZE, "max_length": MAX_LENGTH}
    floor = plan(models[family], texts, [METRIC], config=RunConfig(**base, memory_budget=1))[0]
    assert floor.micro_batch == 1
    budget = floor.peak_bytes
    assert plan(models[family], texts, [METRIC], config=RunConfig(**base, memory_budget=budget))[0].micro_batch == 1
    whole, whole_rows = _run_counting_rows(load_hf(models[family], family), texts, tokenizer)
    micro, micro_rows = _run_counting_rows(load_hf(models[family], family), texts, tokenizer, memory_budget=budget)
    assert whole_rows == [4, 4, 4] and micro_rows == [1] * 12
    torch.testing.assert_close(torch.tensor(micro.value("layer_norm")), torch.tensor(whole.value("layer_norm")),
                               rtol=1e-5, atol=0)
    assert micro.value("outside_norm") == pytest.approx(whole.value("outside_norm"), rel=1e-5)
    assert micro.value("total_norm") == pytest.approx(whole.value("total_norm"), rel=1e-5)
    check_declared_cost(micro)
