"""All the plugin's metrics in one run: one forward and one backward per batch, per-example
gradients computed once per batch, the same numbers as each metric alone, costs, round trip."""

from __future__ import annotations

import math

import pytest
import torch

from tensorscope_core import RunConfig, analyze, builtin_corpus
from tensorscope_core.testing import check_declared_cost, check_roundtrip

PER_MODEL = ["gradients.flow", "gradients.pathology", "gradients.task_conflict", "gradients.sample_conflicts",
             "gradients.tracin_terms"]
MODEL_SET = ["gradients.tracin", "gradients.critical_samples"]
CONFIG = RunConfig(batch_size=4, max_length=32)


def _numbers(result) -> list[float]:
    out: list[float] = []
    for v in result.values.values():
        if hasattr(v, "value") and isinstance(v.value, float):
            out.append(v.value)
        elif hasattr(v, "values") and isinstance(v.values, list):
            out += [x for x in v.values if isinstance(x, float)]
    return [math.nan if x is None else x for x in out]


def test_all_metrics_share_one_run(models, tmp_path):
    corpus = builtin_corpus()
    data = {"train": corpus[:12], "test": corpus[12:20]}  # 3 + 2 batches
    res = analyze(models["llama"], data=data, metrics=PER_MODEL + MODEL_SET,
                  params={"gradients.tracin": {"default_learning_rate": 1e-3},
                          "gradients.critical_samples": {"default_learning_rate": 1e-3}}, config=CONFIG)
    record = res.record.models[0]
    assert record.passes == {"forward": 5, "backward": 5, "per_example_backward": 5}
    # one vmapped per-example call per batch for sample_conflicts and tracin_terms together
    assert record.model_calls["artifact:per_example_grads"] == 5
    for name in PER_MODEL:
        result = record.metrics[name]
        assert result.status == "ok", (name, result.reason)
        check_declared_cost(result)
        alone = analyze(models["llama"], data=data, metrics=[name], config=CONFIG).get(name)
        torch.testing.assert_close(torch.tensor(_numbers(result)), torch.tensor(_numbers(alone)),
                                   rtol=1e-6, atol=1e-12, equal_nan=True, msg=name)
    for name in MODEL_SET:
        assert res.get(name).status == "ok", res.get(name).reason
    assert res.get("gradients.tracin").value("n_checkpoints") == 1
    check_roundtrip(res, tmp_path / "out")


def test_bad_parameter_selection_is_an_error_with_the_reason(models):
    res = analyze(models["gpt2"], data={"a": builtin_corpus()[:4], "b": builtin_corpus()[4:8]},
                  metrics=["gradients.sample_conflicts"], params={"gradients.sample_conflicts": {"layers": [7]}},
                  config=CONFIG)
    result = res.get("gradients.sample_conflicts")
    assert result.status == "error"
    assert "layers [7] are out of range" in result.reason
    assert pytest  # keep the import for parametrised extensions
