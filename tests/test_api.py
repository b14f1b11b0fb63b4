"""The public API surface: analyze_models alias, Analyzer, plan."""

from __future__ import annotations

from pathlib import Path

import pytest

import tensorscope_core as ts
from tensorscope_core.errors import BadParameterError
from tensorscope_core.testing import random_token_data, tiny_model


def test_analyze_models_is_analyze() -> None:
    assert ts.analyze_models is ts.analyze


def test_analyzer_validates_at_construction_and_runs_like_analyze(tmp_path: Path) -> None:
    with pytest.raises(BadParameterError, match="dead_threshold"):
        ts.Analyzer(["basic.activation_stats"], params={"basic.activation_stats": {"dead_threshold": -1}})
    folder = tiny_model("gpt2", tmp_path / "m", with_tokenizer=False)
    data = random_token_data(64, n=6, length=10)
    config = ts.RunConfig(batch_size=3)
    analyzer = ts.Analyzer(["basic.loss"], config=config)
    plans = analyzer.plan(str(folder), data)
    assert [p.kind for p in plans[0].passes] == ["forward"]
    via_class = analyzer.run(str(folder), data).get("basic.loss").value("loss")
    via_function = ts.analyze(str(folder), data, ["basic.loss"], config=config).get("basic.loss").value("loss")
    assert via_class == via_function


def test_a_module_passed_in_is_put_back_as_it_was() -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16))
    model.train()
    kernel = model.config._attn_implementation
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    res = ts.analyze(model, data=random_token_data(40, n=4, length=8),
                     metrics=["basic.loss", "basic.grad_norms"], config=ts.RunConfig(dtype="float64"))
    assert res.get("basic.grad_norms").ok
    assert model.training and next(model.parameters()).dtype == torch.float32
    assert model.config._attn_implementation == kernel
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())


def test_masked_lm_task_loss_does_not_depend_on_other_tasks(tmp_path: Path) -> None:
    folder = tiny_model("bert", tmp_path / "bert")
    a, b = random_token_data(300, n=8, length=12, seed=1), random_token_data(300, n=4, length=12, seed=2)
    config = ts.RunConfig(batch_size=4)
    together = ts.analyze(str(folder), {"a": a, "b": b}, ["basic.loss"], config=config).get("basic.loss")
    alone = ts.analyze(str(folder), {"b": b}, ["basic.loss"], config=config).get("basic.loss")
    assert together.value("loss/b") == alone.value("loss/b")


def test_a_parameter_can_name_the_metric_to_read(tmp_path: Path) -> None:
    """Metric.metric_needs(params): a dependency chosen by the user, resolved and passed like a fixed one."""
    import tensorscope_core.plugins as plugins_module
    from tensorscope_core.plugins import build_registry, plugin_module

    class SourceParams(ts.Params):
        source: str = "basic.weight_norms"
        field: str = "total_norm"

    class Reader(ts.Metric):
        name = "t.reader"
        Params = SourceParams
        artifacts = ("weights",)

        @classmethod
        def metric_needs(cls, params: SourceParams) -> tuple[str, ...]:
            return (params.source,)

        def finalize(self):
            return {"read": self.deps[self.params.source].value(self.params.field)}

    saved = plugins_module._REGISTRY
    plugins_module._REGISTRY = build_registry(extra_plugins=[(
        "t", plugin_module("t", register_metrics=lambda register: register(Reader)))])
    try:
        folder = tiny_model("gpt2", tmp_path / "m", with_tokenizer=False)
        res = ts.analyze(str(folder), random_token_data(64, n=4, length=8), ["t.reader"],
                         params={"t.reader": {"source": "basic.loss", "field": "loss"}})
        assert res.get("t.reader").value("read") == res.get("basic.loss").value("loss")
        assert "basic.weight_norms" not in res.model().metrics
        missing = ts.analyze(str(folder), None, ["t.reader"], params={"t.reader": {"source": "fisher.masks"}})
        assert "pip install 'tensorscope[fisher]'" in missing.get("t.reader").reason
    finally:
        plugins_module._REGISTRY = saved
