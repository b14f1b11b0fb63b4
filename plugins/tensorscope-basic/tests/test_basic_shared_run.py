"""All four metrics in one run: one forward and one backward per batch, the same numbers as
each metric run alone, and declared costs within 15% of what each metric held."""

from __future__ import annotations

import pytest
import torch
from basic_reference import ALL, BATCH_SIZE, MAX_LENGTH

from tensorscope_core import RunConfig, analyze
from tensorscope_core.testing import check_declared_cost, random_token_data, run_metric

METRICS = ["basic.loss", "basic.activation_stats", "basic.grad_norms", "basic.weight_norms"]
CONFIG = RunConfig(batch_size=BATCH_SIZE, max_length=MAX_LENGTH)


def _numbers(result) -> dict[str, list[float]]:
    out = {}
    for field, v in result.values.items():
        if hasattr(v, "values"):
            out[field] = list(v.values)
        else:
            out[field] = [v.value, v.ci_low, v.ci_high]
    return {k: [float("nan") if x is None else x for x in v] for k, v in out.items()}


@pytest.mark.parametrize("family", ALL)
def test_one_forward_one_backward_per_batch(family, models, texts):
    """12 padded texts in batches of 4: 3 forwards, 3 backwards and 1 weights pass for all four."""
    res = analyze(models[family], data=texts, metrics=METRICS, config=CONFIG)
    record = res.record.models[0]
    assert record.passes == {"weights": 1, "forward": 3, "backward": 3}
    for name in METRICS:
        result = record.metrics[name]
        assert result.status == "ok", result.reason
        check_declared_cost(result)
        alone = run_metric(name, models[family], texts)
        assert alone.values.keys() == result.values.keys()
        for field, numbers in _numbers(result).items():
            torch.testing.assert_close(torch.tensor(numbers, dtype=torch.float64),
                                       torch.tensor(_numbers(alone)[field], dtype=torch.float64),
                                       rtol=1e-6, atol=0, equal_nan=True, msg=f"{name}.{field}")


def test_declared_cost_with_tasks_and_max_batches(models, vocab):
    """Costs that scale with the data (sequences, batches) still match what was held when the
    data has named tasks and max_batches cuts it short."""
    data = {"a": random_token_data(vocab, n=10, length=12, seed=5),
            "b": random_token_data(vocab, n=6, length=8, seed=6)}
    res = analyze(models["llama"], data=data, metrics=METRICS,
                  config=RunConfig(batch_size=BATCH_SIZE, max_length=MAX_LENGTH, max_batches=2))
    record = res.record.models[0]
    assert record.passes == {"weights": 1, "forward": 4, "backward": 4}  # 2 batches of each task
    for name in METRICS:
        assert record.metrics[name].status == "ok", record.metrics[name].reason
        check_declared_cost(record.metrics[name])
    assert record.metrics["basic.loss"].values["loss"].n == 8 * 11 + 6 * 7
    assert record.metrics["basic.grad_norms"].values["total_norm"].n == 4
