"""The core's ``per_example_grads`` artifact, which the plugin's per-example metrics read, declares the
calls of the model it makes (``own_passes``), in a configuration other than the pinned run's: batches
of 3 over tasks of 5 sequences (a short last batch per task). The plugin's metrics make no call of the
model themselves."""

from __future__ import annotations

import pytest

from tensorscope_core import RunConfig, analyze, builtin_corpus
from tensorscope_core.testing import check_declared_passes, tiny_model

METRIC = "gradients.sample_conflicts"
CONFIG = RunConfig(batch_size=3, max_length=12, max_batches=2)  # batches of 3, 2, 3, 2 rows


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return tiny_model("bert", tmp_path_factory.mktemp("passes") / "bert", seed=0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_per_example_grads_declares_its_calls(models, bert, family):
    """One vmapped call per micro-batch (4); a masked-LM encoder loops, one call per sequence (10),
    exactly: the core knows an encoder loops before its first call (no vmap attempt)."""
    corpus = builtin_corpus()
    folder = bert if family == "bert" else models[family]
    res = analyze(folder, data={"a": corpus[:5], "b": corpus[5:10]}, metrics=[METRIC], config=CONFIG)
    result = res.get(METRIC)
    assert result.ok, result.reason
    check_declared_passes(result)  # the metric itself: none
    model = res.record.models[0]
    declared, counted = model.passes.get("per_example_backward", 0), model.model_calls.get("artifact:per_example_grads")
    assert declared == counted == (10 if family == "bert" else 4)
