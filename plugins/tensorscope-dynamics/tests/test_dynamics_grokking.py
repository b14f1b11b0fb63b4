"""dynamics.grokking on synthetic curves (the spec's ratio 100) and on the run's named tasks;
dynamics.task_accuracy against the model's own logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tensorscope_core import RunConfig, analyze
from tensorscope_core.plugin_api import BadParameterError
from tensorscope_core.testing import check_declared_cost, random_token_data

STEPS = (10, 30, 100, 300, 1000, 3000, 10_000, 30_000)


def _curve(saturates_at: int) -> list[float]:
    return [min(1.0, 0.1 + 0.9 * s / saturates_at) for s in STEPS]


def test_synthetic_curves_give_ratio_100(bare_gpt2):
    """Spec: train saturates at step 100, held-out at 10,000 -> ratio 100 (delay 9,900)."""
    names = [f"step-{s}" for s in STEPS]
    params = {
        "train_outcome": dict(zip(names, _curve(100), strict=True)),
        "test_outcome": dict(zip(names, _curve(10_000), strict=True)),
        "theta": 0.99,
    }
    ids = random_token_data(64, n=2, length=4)
    res = analyze(
        {n: bare_gpt2 for n in reversed(names)},
        data=ids,
        metrics=["dynamics.grokking"],
        params={"dynamics.grokking": params},
        config=RunConfig(batch_size=2),
    )
    result = res.get("dynamics.grokking")
    assert (result.value("t_train"), result.value("t_test")) == (100, 10_000)
    assert result.value("ratio") == 100 and result.value("delay") == 9_900
    assert [r[1] for r in result.value("curves").rows] == list(STEPS)  # step order, whatever the given order
    assert not result.value("note").rows
    params["theta"] = 1.5
    with pytest.raises(BadParameterError):
        analyze(bare_gpt2, data=ids, metrics=["dynamics.grokking"], params={"dynamics.grokking": params})


def test_tasks_accuracy_against_the_models_logits(models, tokenizer):
    """dynamics.task_accuracy per task equals top-1 accuracy from the model's own logits, and
    grokking reads it: at theta 0 both curves start at the first checkpoint."""
    data = {"train": ["the cat sat on the mat", "a dog ran"], "test": ["the bird flew over the old house today"]}
    res = analyze(
        {"step-1": models["gpt2"], "step-2": models["gpt2"]},
        data=data,
        metrics=["dynamics.grokking", "dynamics.task_accuracy"],
        params={"dynamics.grokking": {"theta": 0.0}},
        config=RunConfig(batch_size=2),
    )
    model = AutoModelForCausalLM.from_pretrained(models["gpt2"], attn_implementation="eager")
    for task, texts in data.items():
        hits, total = 0, 0
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            with torch.no_grad():
                pred = model(ids).logits[0, :-1].argmax(-1)
            hits, total = hits + int((pred == ids[0, 1:]).sum()), total + ids.shape[1] - 1
        assert res.get("dynamics.task_accuracy", model="step-1").value(f"accuracy/{task}") == pytest.approx(
            hits / total
        )
    check_declared_cost(res.get("dynamics.task_accuracy", model="step-1"))
    grok = res.get("dynamics.grokking")
    assert (grok.value("t_train"), grok.value("t_test"), grok.value("delay")) == (1, 1, 0)


def test_loss_curves_and_missing_tasks(models):
    data = {"train": ["the cat sat on the mat"], "test": ["a dog ran to the old house"]}
    res = analyze(
        {"step-1": models["llama"], "step-2": models["llama"]},
        data=data,
        metrics=["dynamics.grokking"],
        params={"dynamics.grokking": {"quantity": "loss", "theta": 0.01}},
        config=RunConfig(batch_size=1),
    )
    grok = res.get("dynamics.grokking")
    assert grok.ok and grok.value("t_train") is None and grok.value("ratio") is None
    assert len(grok.value("note").rows) == 2  # neither random-init curve reaches 0.01 nats
    res = analyze({"a": models["llama"], "b": models["llama"]}, data=["the cat sat"], metrics=["dynamics.grokking"])
    grok = res.get("dynamics.grokking")  # untasked data: it does not apply, so skipped with the fix
    assert grok.status == "skipped" and "named tasks 'train' and 'test'" in grok.reason
