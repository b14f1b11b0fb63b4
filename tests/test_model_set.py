"""Model-set metrics see every model's view and per-model results (checkpoints, base + fine-tunes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tensorscope_core import ModelSetMetric, NoParams, ScalarValue, analyze
from tensorscope_core.testing import temporary_plugin, tiny_model


class WeightDistance(ModelSetMetric):
    """||theta_b - theta_a||_2 between the first two models, and the change of total weight norm."""

    name = "testset.weight_distance"
    summary = "distance between two models' weights"
    Params = NoParams
    requires_metrics = ("basic.weight_norms",)
    fields = {"distance": "L2 distance", "norm_change": "total_norm(b) - total_norm(a)"}

    def compute_set(self, views, results):
        (a, va), (b, vb) = list(views.items())[:2]
        pa, pb = dict(va.model.named_parameters()), dict(vb.model.named_parameters())
        distance = sum(float((pa[k].detach().double() - pb[k].detach().double()).pow(2).sum()) for k in pa) ** 0.5
        change = results[b]["basic.weight_norms"].value("total_norm") - \
            results[a]["basic.weight_norms"].value("total_norm")
        return {"distance": ScalarValue(value=distance), "norm_change": ScalarValue(value=change)}


@pytest.fixture
def registry_with_set_metric() -> Iterator[None]:
    with temporary_plugin("testset", metrics=[WeightDistance]):
        yield


def test_model_set_metric_gets_all_models_and_their_results(tmp_path: Path, registry_with_set_metric: None) -> None:
    a = tiny_model("llama", tmp_path / "a", seed=0, with_tokenizer=False)
    b = tiny_model("llama", tmp_path / "b", seed=1, with_tokenizer=False)
    res = analyze({"a": str(a), "b": str(b)}, metrics=["testset.weight_distance"])
    result = res.get("testset.weight_distance")
    assert result.status == "ok", result.reason
    from transformers import AutoModelForCausalLM

    ma, mb = AutoModelForCausalLM.from_pretrained(a), AutoModelForCausalLM.from_pretrained(b)
    sb, sa = mb.state_dict(), ma.state_dict()
    want = sum(float((sa[k].double() - sb[k].double()).pow(2).sum()) for k in sa) ** 0.5
    assert result.value("distance") == pytest.approx(want, rel=1e-9)
    norm = lambda m: float(torch.sqrt(sum(p.detach().double().pow(2).sum() for p in m.parameters())))  # noqa: E731
    assert result.value("norm_change") == pytest.approx(norm(mb) - norm(ma), rel=1e-9)
    assert set(res.models) == {"a", "b"}
    assert all(res.get("basic.weight_norms", model=m).ok for m in ("a", "b"))


def test_the_progress_bar_counts_batches_and_every_metric_result(tmp_path: Path, registry_with_set_metric: None,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """One bar over the run: each member's batches of its data stage, one step per per-model result
    (cached, skipped and finalized alike), one per model-set result; it ends full, and its postfix names
    a metric while that metric finalizes."""
    import re

    from tensorscope_core import RunConfig

    a = tiny_model("gpt2", tmp_path / "a", seed=0)
    b = tiny_model("gpt2", tmp_path / "b", seed=1)
    metrics = ["basic.loss", "basic.weight_norms", "testset.weight_distance"]
    config = RunConfig(progress=True, batch_size=4, cache_dir=str(tmp_path / "cache"))
    res = analyze({"a": str(a), "b": str(b)}, metrics=metrics, config=config)
    batches = res.record.models[0].passes["forward"]
    steps = 2 * (batches + 2) + 1  # one data stage of batches + 2 per-model results, per member; 1 set result
    err = capsys.readouterr().err
    assert f"{steps}/{steps}" in err
    assert re.search(r"(a|b): basic\.loss", err) and "model set: testset.weight_distance" in err
    assert "Loading weights" not in err  # transformers' own bars stay off while the run loads a model
    analyze({"a": str(a), "b": str(b)}, metrics=metrics, config=config)  # every result from the cache
    assert f"{steps}/{steps}" in capsys.readouterr().err
