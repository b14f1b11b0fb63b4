"""The scheduler and the run: name and parameter validation, shared passes, failure
isolation, time limits, out-of-memory retry, micro-batching and the memory plan, hook
hygiene, skips and dependencies. Test metrics come from a throwaway plugin."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from core_helpers import BASIC, count_hooks, flat
from pydantic import Field

from tensorscope_core import Metric, Params, RunConfig, Step, analyze, plan
from tensorscope_core.errors import (
    BadParameterError,
    MetricCycleError,
    PlanDoesNotFitError,
    UnknownMetricError,
)
from tensorscope_core.scheduler.run import MetricFailed

pytestmark = pytest.mark.usefixtures("basic_only")

CFG = RunConfig(batch_size=4, max_length=32)


# -- throwaway metrics --------------------------------------------------------------------


class Boom(Metric):
    name = "t.boom"
    artifacts = ("token_loss",)

    def update(self, step: Step) -> None:
        raise ValueError("kaboom on purpose")

    def finalize(self) -> dict[str, float]:
        return {"x": 1.0}


class NeedsBoom(Metric):
    name = "t.needs_boom"
    artifacts = ("token_loss",)
    requires_metrics = ("t.boom",)

    def finalize(self) -> dict[str, float]:
        return {"x": 1.0}


class CycleA(Metric):
    name = "t.cycle_a"
    artifacts = ("weights",)
    requires_metrics = ("t.cycle_b",)


class CycleB(Metric):
    name = "t.cycle_b"
    artifacts = ("weights",)
    requires_metrics = ("t.cycle_a",)


class NeedsFisher(Metric):
    name = "t.needs_fisher"
    artifacts = ("weights",)
    requires_metrics = ("fisher.grouped",)

    def finalize(self) -> dict[str, float]:
        return {"x": 1.0}


class NeedsMissingArtifact(Metric):
    name = "t.needs_missing_artifact"
    artifacts = ("resid_grads",)

    def finalize(self) -> dict[str, float]:
        return {"x": 1.0}


class Sleepy(Metric):
    name = "t.sleepy"
    artifacts = ("token_loss",)

    def update(self, step: Step) -> None:
        time.sleep(30)  # interrupted by the run's time limit

    def finalize(self) -> dict[str, float]:
        return {"x": 1.0}


class NotHere(Metric):
    name = "t.not_here"
    artifacts = ("token_loss",)

    @classmethod
    def skip_reason(cls, params: Any, view: Any, data: Any) -> str | None:
        return f"does not apply to {view.family} on purpose"

    def update(self, step: Step) -> None:
        raise AssertionError("a skipped metric never runs")

    def finalize(self) -> dict[str, float]:
        raise AssertionError("a skipped metric never runs")


class Source(Metric):
    name = "t.source"
    artifacts = ("weights",)

    def finalize(self) -> dict[str, float]:
        assert self.view is not None
        return {"n_layers": float(self.view.n_layers), "three": 3.0}


class Dependent(Metric):
    """Stage 1: reads its dependency's finished result and counts the tokens it saw."""

    name = "t.dependent"
    artifacts = ("token_loss",)
    requires_metrics = ("t.source",)

    def setup(self) -> None:
        self.seen_deps = dict(self.deps)
        self.tokens = 0

    def update(self, step: Step) -> None:
        self.tokens += int(step.target_mask.sum())

    def finalize(self) -> dict[str, float]:
        dep = self.seen_deps["t.source"]
        assert dep.status == "ok"
        return {"six": 2 * dep.value("three"), "layers": dep.value("n_layers"), "tokens": float(self.tokens)}


class EchoParams(Params):
    scale: float = Field(1.0, gt=0)


class Echo(Metric):
    """Records which artifacts each update received."""

    name = "t.echo"
    artifacts = ("resid",)
    Params = EchoParams
    calls: list[tuple[str, ...]] = []

    def update(self, step: Step) -> None:
        Echo.calls.append(tuple(sorted(step.artifacts)))

    def finalize(self) -> dict[str, float]:
        return {"updates": float(len(Echo.calls)) * self.params.scale}


# -- helpers ------------------------------------------------------------------------------


def gpt2_module(model_dirs: dict[str, Path]) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(model_dirs["gpt2"], local_files_only=True)


class RowsRecorder:
    """A forward pre-hook recording the rows of each forward; raises a simulated
    out-of-memory error above ``oom_above`` rows."""

    def __init__(self, module: torch.nn.Module, oom_above: int | None = None) -> None:
        self.rows: list[int] = []
        self.oom_above = oom_above
        self.handle = module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        self.rows.append(int(ids.shape[0]))
        if self.oom_above is not None and ids.shape[0] > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")


def statuses(res: Any) -> dict[str, str]:
    return {name: r.status for name, r in res.model().metrics.items()}


def grad_and_loss(res: Any) -> torch.Tensor:
    g, loss = res.get("basic.grad_norms"), res.get("basic.loss")
    return flat([loss.value("loss"), *g.value("layer_norm"), g.value("outside_norm"), g.value("total_norm")])


# -- names, parameters, cycles ------------------------------------------------------------


def test_unknown_metric_suggests_close_matches(model_dirs: dict[str, Path]) -> None:
    with pytest.raises(UnknownMetricError) as info:
        analyze(str(model_dirs["gpt2"]), metrics=["basic.los"], config=CFG)
    assert "unknown metric 'basic.los'" in str(info.value) and "'basic.loss'" in str(info.value)
    assert info.value.exit_code == 2
    with pytest.raises(UnknownMetricError, match="'basic.loss'"):
        analyze(str(model_dirs["gpt2"]), metrics="loss", config=CFG)  # bare name, no family
    with pytest.raises(UnknownMetricError, match="'basic.grad_norms'"):  # a params key is a metric name too
        analyze(str(model_dirs["gpt2"]), metrics=["basic.loss"], params={"basic.grad_norm": {}}, config=CFG)


def test_bad_parameters_name_the_field(model_dirs: dict[str, Path]) -> None:
    folder = str(model_dirs["gpt2"])
    with pytest.raises(BadParameterError) as info:
        analyze(folder, metrics=["basic.activation_stats"], params={"basic.activation_stats": {"dead_treshold": 0.1}},
                config=CFG)
    assert "dead_treshold" in str(info.value) and "did you mean 'dead_threshold'" in str(info.value)
    assert info.value.exit_code == 2
    with pytest.raises(BadParameterError, match="dead_threshold"):
        analyze(folder, metrics=["basic.activation_stats"], params={"basic.activation_stats": {"dead_threshold": -1}},
                config=CFG)
    with pytest.raises(BadParameterError, match="basic.loss"):
        analyze(folder, metrics=["basic.loss"], params={"basic.loss": {"anything": 1}}, config=CFG)


def test_cycle_between_metrics_is_refused(use_registry: Callable[..., Any], model_dirs: dict[str, Path]) -> None:
    use_registry(CycleA, CycleB)
    with pytest.raises(MetricCycleError) as info:
        analyze(str(model_dirs["gpt2"]), metrics=["t.cycle_a"], config=CFG)
    assert "t.cycle_a" in str(info.value) and "t.cycle_b" in str(info.value)


# -- shared passes ------------------------------------------------------------------------


def test_all_basic_metrics_share_one_pass_per_batch(model_dirs: dict[str, Path], tokens: torch.Tensor) -> None:
    res = analyze(str(model_dirs["gpt2"]), data=tokens, metrics=list(BASIC), config=CFG)
    assert set(statuses(res).values()) == {"ok"}
    assert res.model().passes == {"weights": 1, "forward": 3, "backward": 3}
    loss_only = analyze(str(model_dirs["gpt2"]), data=tokens, metrics=["basic.loss"], config=CFG)
    assert loss_only.model().passes == {"forward": 3}
    weights_only = analyze(str(model_dirs["gpt2"]), metrics=["basic.weight_norms"], config=CFG)
    assert weights_only.model().passes == {"weights": 1}
    assert weights_only.model().n_sequences == 0  # no data was prepared for a weights-only run


def test_model_runs_once_per_batch_for_many_metrics(use_registry: Callable[..., Any], model_dirs: dict[str, Path],
                                                    tokens: torch.Tensor) -> None:
    use_registry(Echo)
    Echo.calls = []
    module = gpt2_module(model_dirs)
    rec = RowsRecorder(module)
    res = analyze(module, data=tokens, metrics=[*BASIC, "t.echo"], params={"t.echo": {"scale": 2.0}}, config=CFG)
    rec.handle.remove()
    assert rec.rows == [4, 4, 4]  # one forward per batch, serving all five metrics
    assert res.model().passes == {"weights": 1, "forward": 3, "backward": 3}
    assert Echo.calls == [("resid",)] * 3  # a metric sees only the artifacts it asked for
    assert res.get("t.echo").value("updates") == 6.0
    assert res.get("t.echo").params == {"scale": 2.0}


# -- failure isolation --------------------------------------------------------------------


def test_a_failing_metric_does_not_stop_the_others(use_registry: Callable[..., Any], model_dirs: dict[str, Path],
                                                   tokens: torch.Tensor) -> None:
    use_registry(Boom, NeedsBoom)
    res = analyze(str(model_dirs["gpt2"]), data=tokens, metrics=[*BASIC, "t.needs_boom"], config=CFG)
    boom, child = res.get("t.boom"), res.get("t.needs_boom")  # t.boom runs as a dependency
    assert boom.status == "error" and boom.error_type == "ValueError"
    assert boom.reason == "ValueError: kaboom on purpose"
    assert child.status == "skipped" and "t.boom" in child.reason and "kaboom on purpose" in child.reason
    for name in BASIC:
        assert res.get(name).ok, res.get(name).reason
    reference = analyze(str(model_dirs["gpt2"]), data=tokens, metrics=list(BASIC), config=CFG)
    assert torch.equal(grad_and_loss(res), grad_and_loss(reference))


def test_fail_fast_raises_at_the_first_failure(use_registry: Callable[..., Any], model_dirs: dict[str, Path],
                                               tokens: torch.Tensor) -> None:
    use_registry(Boom)
    module = gpt2_module(model_dirs)
    before = count_hooks(module)
    with pytest.raises(MetricFailed, match="t.boom failed .*kaboom on purpose"):
        analyze(module, data=tokens, metrics=["basic.loss", "t.boom"],
                config=CFG.model_copy(update={"fail_fast": True}))
    assert count_hooks(module) == before


def test_missing_plugin_dependency_says_what_to_install(use_registry: Callable[..., Any],
                                                        model_dirs: dict[str, Path], tokens: torch.Tensor) -> None:
    use_registry(NeedsFisher, NeedsMissingArtifact)
    res = analyze(str(model_dirs["gpt2"]), data=tokens,
                  metrics=["t.needs_fisher", "t.needs_missing_artifact", "basic.loss"], config=CFG)
    fisher = res.get("t.needs_fisher")
    assert fisher.status == "error" and "fisher.grouped" in fisher.reason
    assert "pip install 'tensorscope[fisher]'" in fisher.reason
    artifact = res.get("t.needs_missing_artifact")
    assert artifact.status == "error" and "'resid_grads'" in artifact.reason and "'resid_grad'" in artifact.reason
    assert res.get("basic.loss").ok


def test_metric_time_limit(use_registry: Callable[..., Any], model_dirs: dict[str, Path],
                           tokens: torch.Tensor) -> None:
    use_registry(Sleepy)
    res = analyze(str(model_dirs["gpt2"]), data=tokens, metrics=["t.sleepy", "basic.loss", "basic.weight_norms"],
                  config=CFG.model_copy(update={"metric_timeout_s": 2.0}))
    sleepy = res.get("t.sleepy")
    assert sleepy.status == "error" and sleepy.error_type == "MetricTimeoutError"
    assert "exceeded its time limit of 2 s" in sleepy.reason  # the configured limit
    assert res.get("basic.loss").ok and res.get("basic.weight_norms").ok


# -- out of memory and micro-batching -----------------------------------------------------


def test_out_of_memory_halves_the_micro_batch(model_dirs: dict[str, Path], tokens: torch.Tensor) -> None:
    metrics = ["basic.loss", "basic.grad_norms", "basic.activation_stats"]
    reference = analyze(gpt2_module(model_dirs), data=tokens, metrics=metrics, config=CFG)
    module = gpt2_module(model_dirs)
    rec = RowsRecorder(module, oom_above=2)
    res = analyze(module, data=tokens, metrics=metrics, config=CFG)
    rec.handle.remove()
    assert rec.rows == [4, 2, 2, 2, 2, 2, 2]  # halved once, then kept for the remaining batches
    assert set(statuses(res).values()) == {"ok"}
    assert res.model().passes == {"forward": 3, "backward": 3}
    torch.testing.assert_close(grad_and_loss(res), grad_and_loss(reference), rtol=1e-5, atol=0)
    torch.testing.assert_close(flat(res.get("basic.activation_stats").value("resid_norm")),
                               flat(reference.get("basic.activation_stats").value("resid_norm")), rtol=1e-5, atol=0)


def test_out_of_memory_at_the_floor_fails_the_pass_metrics(model_dirs: dict[str, Path], tokens: torch.Tensor) -> None:
    module = gpt2_module(model_dirs)
    before = count_hooks(module)
    rec = RowsRecorder(module, oom_above=2)
    res = analyze(module, data=tokens, metrics=["basic.loss", "basic.grad_norms", "basic.weight_norms"],
                  config=CFG.model_copy(update={"min_micro_batch": 4}))
    rec.handle.remove()
    assert rec.rows == [4]
    for name in ("basic.loss", "basic.grad_norms"):
        result = res.get(name)
        assert result.status == "error" and "out of memory at micro-batch 4" in result.reason
    assert res.get("basic.weight_norms").ok  # the weights pass needs no data
    assert count_hooks(module) == before
    assert all(p.grad is None for p in module.parameters())
    rec = RowsRecorder(module, oom_above=2)
    with pytest.raises(MetricFailed, match="out of memory"):
        analyze(module, data=tokens, metrics=["basic.loss"],
                config=CFG.model_copy(update={"min_micro_batch": 4, "fail_fast": True}))
    rec.handle.remove()
    assert count_hooks(module) == before


def _peak_at_micro_batch_1(source: Any, tokens: torch.Tensor, metrics: list[str]) -> int:
    """The declared peak at micro-batch 1: plan against a 1-byte budget (it halves to 1), every
    metric kept (strict_budget)."""
    (p,) = plan(source, tokens, metrics, config=CFG.model_copy(update={"memory_budget": 1, "strict_budget": True}))
    assert p.micro_batch == 1 and not p.fits
    return p.peak_bytes


def test_micro_batching_does_not_change_the_numbers(model_dirs: dict[str, Path], tokens: torch.Tensor) -> None:
    metrics = ["basic.loss", "basic.grad_norms"]
    folder = str(model_dirs["gpt2"])
    budget = _peak_at_micro_batch_1(folder, tokens, metrics)
    tight = CFG.model_copy(update={"memory_budget": budget})
    (p,) = plan(folder, tokens, metrics, config=tight)
    assert p.fits and p.micro_batch == 1 and p.batch_size == 4
    (full_plan,) = plan(folder, tokens, metrics, config=CFG)
    assert full_plan.micro_batch == 4 and full_plan.peak_bytes > budget

    module = gpt2_module(model_dirs)
    rec = RowsRecorder(module)
    micro = analyze(module, data=tokens, metrics=metrics, config=tight)
    rec.handle.remove()
    assert rec.rows == [1] * 12
    module = gpt2_module(model_dirs)
    rec = RowsRecorder(module)
    full = analyze(module, data=tokens, metrics=metrics, config=CFG)
    assert rec.rows == [4, 4, 4]
    assert micro.model().passes == full.model().passes == {"forward": 3, "backward": 3}
    torch.testing.assert_close(grad_and_loss(micro), grad_and_loss(full), rtol=1e-5, atol=0)


def test_plan_that_does_not_fit_refuses_before_running(model_dirs: dict[str, Path], tokens: torch.Tensor,
                                                       tmp_path: Path) -> None:
    metrics = ["basic.loss", "basic.grad_norms"]
    budget = _peak_at_micro_batch_1(str(model_dirs["gpt2"]), tokens, metrics) - 1
    module = gpt2_module(model_dirs)
    rec = RowsRecorder(module)
    cache = tmp_path / "cache"
    config = CFG.model_copy(update={"memory_budget": budget, "cache_dir": cache, "strict_budget": True})
    with pytest.raises(PlanDoesNotFitError) as info:
        analyze(module, data=tokens, metrics=metrics, config=config)
    assert info.value.exit_code == 3
    assert "DOES NOT FIT" in info.value.plan_text and "micro-batch 1" in str(info.value)
    assert rec.rows == []  # no pass ran
    assert not cache.exists() and list(tmp_path.iterdir()) == []  # nothing written


# -- hooks, skips, dependencies -----------------------------------------------------------


def test_hooks_are_removed_after_runs(use_registry: Callable[..., Any], model_dirs: dict[str, Path],
                                      tokens: torch.Tensor) -> None:
    use_registry(Boom)
    module = gpt2_module(model_dirs)
    before = count_hooks(module)
    seen_during: list[int] = []
    handle = module.transformer.h[0].register_forward_hook(lambda m, a, o: seen_during.append(count_hooks(module)))
    analyze(module, data=tokens, metrics=list(BASIC), config=CFG)
    assert min(seen_during) > before + 1  # capture hooks were installed during the run ...
    handle.remove()
    assert count_hooks(module) == before  # ... and removed after it
    res = analyze(module, data=tokens, metrics=["basic.activation_stats", "t.boom"], config=CFG)
    assert res.get("t.boom").status == "error" and res.get("basic.activation_stats").ok
    assert count_hooks(module) == before
    assert all(p.grad is None for p in module.parameters())


def test_skip_reason_gives_a_skipped_result(use_registry: Callable[..., Any], model_dirs: dict[str, Path],
                                            tokens: torch.Tensor) -> None:
    use_registry(NotHere)
    res = analyze(str(model_dirs["gpt2"]), data=tokens, metrics=["t.not_here", "basic.loss"], config=CFG)
    skipped = res.get("t.not_here")
    assert skipped.status == "skipped" and skipped.reason == "does not apply to gpt2 on purpose"
    assert skipped.values == {} and res.get("basic.loss").ok


def test_dependent_metric_receives_its_dependency(use_registry: Callable[..., Any], model_dirs: dict[str, Path],
                                                  tokens: torch.Tensor) -> None:
    use_registry(Source, Dependent)
    res = analyze(str(model_dirs["llama"]), data=tokens, metrics=["t.dependent"], config=CFG)
    assert res.get("t.source").ok  # pulled in as a dependency
    dep = res.get("t.dependent")
    assert dep.ok, dep.reason
    assert dep.value("six") == 6.0 and dep.value("layers") == 2.0
    assert dep.value("tokens") == 12 * 9  # causal: 9 targets per 10-token sequence
    assert list(res.model().metrics) == ["t.source", "t.dependent"]
    assert res.model().passes == {"weights": 1, "forward": 3}


def test_run_without_data_uses_the_builtin_corpus(model_dirs: dict[str, Path]) -> None:
    res = analyze(str(model_dirs["llama"]), metrics=["basic.loss"], config=CFG.model_copy(update={"max_batches": 2}))
    assert res.get("basic.loss").ok and res.model().passes == {"forward": 2}
    from tensorscope_core.data import builtin_corpus

    assert len(builtin_corpus()) > 8
    assert res.model().n_sequences == 8  # max_batches 2 x batch 4: the sequences actually used


def test_masked_lm_without_mask_token_skips_loss_metrics(model_dirs: dict[str, Path], tokens: torch.Tensor) -> None:
    """A BERT given as a bare module has no tokenizer, so no mask token: metrics built on the
    token loss are skipped with the reason; metrics that need no loss still run."""
    from tensorscope_core.testing import tiny_tokenizer

    module = transformers.BertForMaskedLM.from_pretrained(model_dirs["bert"], local_files_only=True)
    res = analyze(module, data=tokens, metrics=["basic.loss", "basic.grad_norms", "basic.activation_stats"],
                  config=CFG)
    for name in ("basic.loss", "basic.grad_norms"):
        assert res.get(name).status == "skipped" and "mask token" in res.get(name).reason
    assert res.get("basic.activation_stats").ok
    with_tok = analyze(module, data=tokens, metrics=["basic.loss"], config=CFG, tokenizer=tiny_tokenizer())
    loss = with_tok.get("basic.loss")
    assert loss.ok and 0 < loss.values["loss"].n < 120  # about 15% of the 120 tokens are predicted


def test_a_metric_that_finds_it_does_not_apply_ends_skipped_with_its_reason(model_dirs: dict[str, Path]) -> None:
    """NotApplicable raised while running: skipped with problem and fix, not error, also under fail_fast."""
    from tensorscope_core.plugin_api import Metric, NotApplicable
    from tensorscope_core.testing import temporary_plugin

    class FindsNoTask(Metric):
        name = "probe.finds_no_task"
        version = "1"
        summary = "raises NotApplicable in finalize"
        fields = {"x": "never"}

        def finalize(self) -> dict[str, float]:
            raise NotApplicable("the data has no task 'test'", "pass data={'train': ..., 'test': ...}")

    with temporary_plugin("probe", metrics=[FindsNoTask]) as registry:
        res = analyze(model_dirs["gpt2"], metrics=["probe.finds_no_task", "basic.loss"],
                      config=RunConfig(fail_fast=True), registry=registry)
    result = res.get("probe.finds_no_task")
    assert result.status == "skipped"
    assert result.reason == "the data has no task 'test': pass data={'train': ..., 'test': ...}"
    assert res.get("basic.loss").ok
