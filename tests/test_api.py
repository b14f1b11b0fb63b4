"""The public API surface: analyze_models alias, Analyzer, plan."""

from __future__ import annotations

from pathlib import Path

import pytest

import tensorscope_core as ts
from tensorscope_core.errors import BadParameterError
from tensorscope_core.testing import random_token_data, temporary_plugin, tiny_model


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

    with temporary_plugin("t", metrics=[Reader]):
        folder = tiny_model("gpt2", tmp_path / "m", with_tokenizer=False)
        res = ts.analyze(str(folder), random_token_data(64, n=4, length=8), ["t.reader"],
                         params={"t.reader": {"source": "basic.loss", "field": "loss"}})
        assert res.get("t.reader").value("read") == res.get("basic.loss").value("loss")
        assert "basic.weight_norms" not in res.model().metrics
        missing = ts.analyze(str(folder), None, ["t.reader"], params={"t.reader": {"source": "probes.masks"}})
        assert "pip install 'tensorscope[probes]'" in missing.get("t.reader").reason


def test_a_metric_reads_the_tensors_of_the_results_it_needs(tmp_path: Path) -> None:
    """Metric.tensor_of: a per-model metric reads its dependency's TensorValue, a model-set metric
    the per-model ones, also when the dependency comes from the cache; nothing else is passed."""
    import torch

    class Source(ts.Metric):
        name = "t.source"
        artifacts = ("weights",)

        def finalize(self):
            return {"first": next(self.view.model.parameters()).detach()[:3, :4].clone(), "n": 1.0}

    class Reader(ts.Metric):
        name = "t.reader"
        artifacts = ("weights",)
        requires_metrics = ("t.source",)

        def finalize(self):
            read = self.tensor_of(self.deps["t.source"], "first")
            with pytest.raises(KeyError, match="no tensor field 'n'"):
                self.tensor_of(self.deps["t.source"], "n")
            return {"doubled": 2 * read}

    class SetReader(ts.ModelSetMetric):
        name = "t.set_reader"
        requires_metrics = ("t.source",)

        def compute_set(self, views, results):
            return {"sum": sum(self.tensor_of(r["t.source"], "first") for r in results.values())}

    class Outsider(ts.Metric):
        name = "t.outsider"
        artifacts = ("weights",)
        requires_metrics = ("t.reader",)

        def finalize(self):
            assert set(self.dep_tensors) == {f"{self.view.name}::t.reader::doubled"}  # not t.source's
            return {"ok": 1.0}

    with temporary_plugin("t", metrics=[Source, Reader, SetReader, Outsider]):
        a = tiny_model("gpt2", tmp_path / "a", with_tokenizer=False)
        b = tiny_model("gpt2", tmp_path / "b", seed=1, with_tokenizer=False)
        config = ts.RunConfig(cache_dir=tmp_path / "cache")
        for _ in range(2):  # the second run takes t.source (and its tensor) from the cache
            res = ts.analyze({"a": str(a), "b": str(b)}, None, ["t.reader", "t.set_reader", "t.outsider"],
                             config=config)
            firsts = [res.tensor("t.source", "first", model=m) for m in ("a", "b")]
            assert res.get("t.outsider", model="a").status == "ok", res.get("t.outsider", model="a").reason
            torch.testing.assert_close(res.tensor("t.reader", "doubled", model="a"), 2 * firsts[0])
            torch.testing.assert_close(res.tensor("t.set_reader", "sum"), firsts[0] + firsts[1])
        assert res.get("t.source", model="a").from_cache


def test_a_per_model_metric_cannot_need_a_model_set_metric(tmp_path: Path) -> None:
    class SetMetric(ts.ModelSetMetric):
        name = "t.set"

        def compute_set(self, views, results):
            return {"n": float(len(views))}

    class NeedsSet(ts.Metric):
        name = "t.needs_set"
        artifacts = ("weights",)
        requires_metrics = ("t.set",)

        def finalize(self):
            return {"x": 1.0}

    with temporary_plugin("t", metrics=[SetMetric, NeedsSet]):
        folder = tiny_model("gpt2", tmp_path / "m", with_tokenizer=False)
        res = ts.analyze(str(folder), None, ["t.needs_set", "basic.weight_norms"])
        result = res.get("t.needs_set")
        assert result.status == "error" and "model-set metric" in (result.reason or "")
        assert res.get("basic.weight_norms").ok


def test_two_models_with_one_name_are_refused_with_how_to_name_them(tmp_path: Path) -> None:
    """Two modules of one class, or one path given twice, would share a name and overwrite each
    other's results: a usage error naming the fix, before anything loads."""
    import transformers

    from tensorscope_core.errors import UsageError

    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    a, b = transformers.GPT2LMHeadModel(config), transformers.GPT2LMHeadModel(config)
    with pytest.raises(UsageError, match="named 'GPT2LMHeadModel'") as err:
        ts.analyze([a, b], None, ["basic.weight_norms"])
    assert "analyze({'a': model_a, 'b': model_b})" in err.value.fix
    folder = tiny_model("gpt2", tmp_path / "m", with_tokenizer=False)
    with pytest.raises(UsageError, match="one path given twice"):
        ts.plan([str(folder), str(folder) + "/"], None, ["basic.weight_norms"])
    named = ts.analyze({"a": a, "b": b}, None, ["basic.weight_norms"])
    assert [m.name for m in named.record.models] == ["a", "b"]


def test_an_artifact_that_fails_fails_only_its_readers(tmp_path: Path) -> None:
    """A producer that raises while deriving: the metrics that read its artifact end in error with the
    cause, the others in the same shared pass keep their results (equal to a run without the reader)."""
    from tensorscope_core.artifacts import ArtifactSpec

    def derive(ctx):
        raise ValueError("this producer cannot read the model")

    broken = ArtifactSpec("t.broken", "forward", "an artifact whose producer raises", lambda v, b, s: 8,
                          derive=derive)

    class Reader(ts.Metric):
        name = "t.reader"
        artifacts = ("t.broken",)

        def update(self, step):
            raise AssertionError("never fed: its artifact failed")

        def finalize(self):
            return {"x": 1.0}

    folder = tiny_model("gpt2", tmp_path / "m", with_tokenizer=False)
    data = random_token_data(64, n=4, length=8)
    with temporary_plugin("t", metrics=[Reader], artifacts=[broken]):
        res = ts.analyze(str(folder), data, ["t.reader", "basic.loss", "basic.activation_stats"])
        alone = ts.analyze(str(folder), data, ["basic.loss"])
        with pytest.raises(ts.errors.TensorScopeError, match="this producer cannot read the model"):
            ts.analyze(str(folder), data, ["t.reader", "basic.loss"], config=ts.RunConfig(fail_fast=True))
    reader = res.get("t.reader")
    assert reader.status == "error" and reader.error_type == "ValueError"
    assert "this producer cannot read the model" in reader.reason
    assert res.get("basic.activation_stats").ok
    assert res.get("basic.loss").value("loss") == alone.get("basic.loss").value("loss")
