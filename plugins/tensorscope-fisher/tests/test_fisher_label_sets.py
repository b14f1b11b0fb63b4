"""The Fisher metrics ask the per-example artifact for the label sets of the Fishers they make only: the
spectrum of the true Fisher, and the diagonal at its ``true-only`` rung, make and hold the sampled-label
scores alone. Known answers: the plan declares one [batch, P] set of rows fewer, exactly, and the values
are those of a run that made both sets (the sampled labels do not depend on what else was asked)."""

from __future__ import annotations

import pytest
import torch
from tensorscope_fisher.fisher_grads import FisherGrads
from transformers import AutoModelForCausalLM

from tensorscope_core import RunConfig, analyze, builtin_corpus, plan
from tensorscope_core.plugin_api import ExampleGrads

CONFIG = RunConfig(batch_size=3, max_length=12, max_batches=2)
DATA = builtin_corpus()[:6]
ONE_SET = {"fisher.spectrum": {"fisher": "true"}, "fisher.diagonal": {"kinds": ["true"], "statistics": "mean"}}


def _artifact_bytes(folder, metric: str, params: dict) -> int:
    (planned,) = plan(folder, DATA, [metric], params={metric: params}, config=CONFIG)
    return sum(p.artifact_bytes for p in planned.passes)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_fisher_plans_one_set_of_rows(models, family):
    """Both Fishers against one: the difference is one set of rows, batch x P in the model's dtype."""
    folder = models[family]
    both = _artifact_bytes(folder, "fisher.diagonal", {"kinds": ["true", "empirical"], "statistics": "mean"})
    one = _artifact_bytes(folder, "fisher.diagonal", ONE_SET["fisher.diagonal"])
    spectrum = _artifact_bytes(folder, "fisher.spectrum", ONE_SET["fisher.spectrum"])
    params = AutoModelForCausalLM.from_pretrained(folder).num_parameters()  # tied weights once, as the layout
    assert both - one == CONFIG.batch_size * params * 4
    assert spectrum == one


@pytest.mark.parametrize("metric", ["fisher.spectrum", "fisher.diagonal"])
def test_one_label_set_gives_the_values_of_both(models, metric):
    """Alone (sampled labels only) and beside a consumer of the observed labels (both made): equal values."""
    folder = models["gpt2"]
    #: a second metric that asks for the observed labels, so the run makes both sets
    other = {"fisher.spectrum": ("fisher.diagonal", {}),
             "fisher.diagonal": ("fisher.spectrum", {"fisher": "empirical"})}
    name, params = other[metric]
    alone = analyze(folder, DATA, [metric], params={metric: ONE_SET[metric]}, config=CONFIG)
    beside = analyze(folder, DATA, [metric, name], params={metric: ONE_SET[metric], name: params}, config=CONFIG)
    a, b = alone.get(metric), beside.get(metric)
    assert a.ok and b.ok, (a.reason, b.reason)
    for field, value in a.values.items():
        if value.kind == "tensor":
            torch.testing.assert_close(alone.tensor(metric, field), beside.tensor(metric, field), rtol=0, atol=0)
        elif value.kind == "scalar":
            assert a.value(field) == b.value(field), field


def test_a_fisher_not_asked_for_says_so():
    grads = ExampleGrads({}, {"sampled": torch.ones(2, 3)}, torch.ones(2), torch.zeros(2))
    scores = FisherGrads.of(grads)
    assert torch.equal(scores.scores("true"), torch.ones(2, 3)) and scores.empirical is None
    with pytest.raises(KeyError, match="empirical Fisher were not made"):
        scores.scores("empirical")
