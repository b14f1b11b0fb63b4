"""gradients.sample_conflicts beside fisher.diagonal: both read the core's ``per_example_grads``, so
the run makes ONE per-example backward per micro-batch for the two plugins together (the merged
request: every parameter, observed and sampled labels), and sample_conflicts' numbers are those of
a run of it alone (which differentiates only its own parameter subset, observed labels)."""

from __future__ import annotations

import math

import pytest
import torch

from tensorscope_core import RunConfig, analyze, builtin_corpus, plan
from tensorscope_core.plugin_api import ScalarValue, SeriesValue, TableValue, TensorValue

pytest.importorskip("tensorscope_fisher")

CONFLICTS = "gradients.sample_conflicts"
FISHER = "fisher.diagonal"
CONFIG = RunConfig(batch_size=4, max_length=32)


def _numbers(res, metric: str) -> dict[str, list[float]]:
    """Every number of the metric's result, by field (tensors flattened, tables' numeric cells)."""
    out: dict[str, list[float]] = {}
    for field, value in res.get(metric).values.items():
        if isinstance(value, TensorValue):
            out[field] = res.tensor(metric, field).double().flatten().tolist()
        elif isinstance(value, ScalarValue):
            out[field] = [math.nan if value.value is None else float(value.value)]
        elif isinstance(value, SeriesValue):
            out[field] = [math.nan if v is None else float(v) for v in value.values]
        elif isinstance(value, TableValue):
            out[field] = [float(c) for row in value.rows for c in row
                          if isinstance(c, int | float) and not isinstance(c, bool)]
    return out


@pytest.mark.parametrize("subset", [{"layers": [1]}, {}])
def test_one_per_example_backward_per_batch_for_both_plugins(models, subset):
    corpus = builtin_corpus()
    data = {"a": corpus[:8], "b": corpus[8:14]}  # batches of 4, 4 | 4, 2
    params = {CONFLICTS: subset}
    together = analyze(models["gpt2"], data=data, metrics=[CONFLICTS, FISHER], params=params, config=CONFIG)
    for metric in (CONFLICTS, FISHER):
        assert together.get(metric).ok, (metric, together.get(metric).reason)
    micro = plan(models["gpt2"], data, [CONFLICTS, FISHER], params=params, config=CONFIG)[0].micro_batch
    micro_batches = sum(-(-rows // micro) for rows in (4, 4, 4, 2))
    record = together.record.models[0]
    assert record.model_calls["artifact:per_example_grads"] == micro_batches
    # and no other per-example backward, by either plugin: the model calls are the shared pass and that
    assert record.passes["per_example_backward"] == micro_batches
    assert set(record.model_calls) == {"shared", "artifact:per_example_grads"}

    alone = analyze(models["gpt2"], data=data, metrics=[CONFLICTS], params=params, config=CONFIG)
    assert alone.record.models[0].model_calls["artifact:per_example_grads"] == micro_batches
    got, want = _numbers(together, CONFLICTS), _numbers(alone, CONFLICTS)
    assert sorted(got) == sorted(want)
    for field, numbers in want.items():
        torch.testing.assert_close(torch.tensor(got[field], dtype=torch.float64),
                                   torch.tensor(numbers, dtype=torch.float64), rtol=1e-5, atol=1e-8,
                                   equal_nan=True, msg=field)
