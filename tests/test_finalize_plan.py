"""What a pass holds while its metrics finalize, one at a time, and costs that follow a dependency's rung.

``finalize_order`` is checked against a brute force over every order; the run must finalize in the
plan's order; a metric's declared cost sees the parameters its dependencies run at."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import Field

from tensorscope_core import Metric, Params, RunConfig, analyze, plan
from tensorscope_core.metric import Rung
from tensorscope_core.results.schema import Cost
from tensorscope_core.scheduler.plan import Finalizing, ModelPlan, finalize_order

MiB = 2**20


def brute_force(metrics: Sequence[Finalizing]) -> int:
    """The smallest peak over every order: states not yet freed + results made so far + one finalize."""
    best = None
    for order in itertools.permutations(metrics):
        held, peak = sum(m.state for m in metrics), 0
        for m in order:
            peak = max(peak, held + m.during)
            held += m.results - m.state
        best = peak if best is None else min(best, peak)
    assert best is not None
    return best


def test_the_finalize_order_holds_least_a_brute_force_finds() -> None:
    rng = random.Random(0)
    for _ in range(300):
        metrics = []
        for i in range(rng.randint(1, 6)):
            results = rng.choice([0, rng.randint(0, 50)])
            metrics.append(Finalizing(f"m{i}", rng.choice([0, rng.randint(0, 50)]), results,
                                      results + rng.choice([0, rng.randint(0, 50)])))
        order, peak = finalize_order(metrics)
        assert sorted(order) == sorted(m.name for m in metrics)
        assert peak == brute_force(metrics), metrics


def test_a_hand_built_pass_frees_its_big_state_before_making_big_results() -> None:
    """a holds 10 and keeps nothing; b holds nothing and makes 8 of results. a first: 10 + 0, then 0 + 8 ->
    peak 10. b first would hold 10 + 8."""
    order, peak = finalize_order([Finalizing("b", 0, 8, 8), Finalizing("a", 10, 0, 0)])
    assert (order, peak) == (["a", "b"], 10)


FINALIZED: list[str] = []


class SizeParams(Params):
    state_mib: int = Field(0, ge=0)
    results_mib: int = Field(0, ge=0)


class Holds(Metric):
    """Declares and holds ``state_mib``; its finalize makes ``results_mib`` of a result tensor."""

    name = "t.holds_a"
    artifacts = ("weights",)
    Params = SizeParams

    @classmethod
    def cost(cls, params: SizeParams, view: Any, shape: Any) -> Cost:
        return Cost(state_bytes=params.state_mib * MiB, result_bytes=params.results_mib * MiB)

    def setup(self) -> None:
        self.held = torch.zeros(self.params.state_mib * MiB, dtype=torch.uint8)

    def finalize(self) -> dict[str, Any]:
        FINALIZED.append(self.name)
        return {"kept": torch.zeros(self.params.results_mib * MiB // 4)}


class HoldsB(Holds):
    name = "t.holds_b"


def test_the_run_finalizes_in_the_plans_order(model_dirs: dict[str, Path], use_registry: Callable[..., Any]) -> None:
    use_registry(HoldsB, Holds)
    folder = str(model_dirs["gpt2"])
    params = {"t.holds_a": {"state_mib": 64}, "t.holds_b": {"results_mib": 32}}
    (p,) = plan(folder, None, ["t.holds_b", "t.holds_a"], params=params, config=RunConfig(memory_budget="64GiB"))
    assert isinstance(p, ModelPlan)
    (weights_pass,) = p.passes
    assert weights_pass.metrics == ["t.holds_a", "t.holds_b"]
    assert weights_pass.peak_bytes == p.weights_bytes + 64 * MiB  # not 64 + 32: a's state is gone when b runs
    FINALIZED.clear()
    res = analyze(folder, None, ["t.holds_b", "t.holds_a"], params=params, config=RunConfig(memory_budget="64GiB"))
    assert res.get("t.holds_a").ok and res.get("t.holds_b").ok
    assert FINALIZED == ["t.holds_a", "t.holds_b"]


class RowsParams(Params):
    rows: int = Field(8, ge=1)


class Producer(Metric):
    """Keeps ``rows`` MiB of results; its ladder halves them."""

    name = "t.producer"
    artifacts = ("weights",)
    Params = RowsParams

    @classmethod
    def cost(cls, params: RowsParams, view: Any, shape: Any) -> Cost:
        return Cost(result_bytes=params.rows * MiB)

    @classmethod
    def ladder(cls, params: RowsParams, view: Any, shape: Any) -> Sequence[Rung]:
        return [Rung("half", RowsParams(rows=params.rows // 2), "half the rows")]

    def finalize(self) -> dict[str, Any]:
        return {"rows": torch.zeros(self.params.rows * MiB // 4)}


class Copier(Metric):
    """Copies the producer's rows: declares as many bytes as the producer runs with."""

    name = "t.copier"
    artifacts = ("weights",)
    requires_metrics = ("t.producer",)

    @classmethod
    def cost(cls, params: Any, view: Any, shape: Any) -> Cost:
        producer = shape.dependency_params.get("t.producer", RowsParams())
        return Cost(result_bytes=producer.rows * MiB)

    def finalize(self) -> dict[str, Any]:
        assert self.shape.dependency_params["t.producer"].rows == self.deps["t.producer"].params["rows"]
        return {"rows": self.tensor_of(self.deps["t.producer"], "rows").clone()}


@pytest.mark.parametrize(("pinned", "rows"), [(None, 8), ("half", 4)])
def test_a_cost_follows_the_rung_its_dependency_runs_at(
        model_dirs: dict[str, Path], use_registry: Callable[..., Any], pinned: str | None, rows: int) -> None:
    use_registry(Producer, Copier)
    folder = str(model_dirs["gpt2"])
    config = RunConfig(memory_budget="64GiB", rungs={"t.producer": pinned} if pinned else {})
    (p,) = plan(folder, None, ["t.copier"], config=config)
    assert isinstance(p, ModelPlan)
    assert p.declared_results == {"t.producer": rows * MiB, "t.copier": rows * MiB}
    res = analyze(folder, None, ["t.copier"], config=config)
    assert res.get("t.copier").ok, res.get("t.copier").reason


class ReturnsADict(Metric):
    name = "t.returns_a_dict"
    artifacts = ("weights",)

    def finalize(self) -> dict[str, Any]:
        return {"nested": {"not": "a value"}, "empty": torch.zeros(0)}


def test_a_value_no_result_field_takes_ends_that_metric_only(
        model_dirs: dict[str, Path], use_registry: Callable[..., Any]) -> None:
    use_registry(ReturnsADict, Holds)
    res = analyze(str(model_dirs["gpt2"]), None, ["t.returns_a_dict", "t.holds_a"],
                  params={"t.holds_a": {"results_mib": 1}})
    bad = res.get("t.returns_a_dict")
    assert bad.status == "error" and "nested" in bad.reason and "the result schema does not take" in bad.reason
    assert res.get("t.holds_a").ok


def test_an_empty_tensor_is_a_tensor_value(model_dirs: dict[str, Path], use_registry: Callable[..., Any]) -> None:
    use_registry(Holds)
    res = analyze(str(model_dirs["gpt2"]), None, ["t.holds_a"])
    assert res.get("t.holds_a").values["kept"].shape == [0]


class KeepsLater(Holds):
    """Runs a stage after t.holds_b, so b's results are kept through its pass on the CPU."""

    name = "t.keeps_later"
    requires_metrics = ("t.holds_b",)


def test_on_an_accelerator_results_go_to_the_host_as_each_metric_finishes(
        tmp_path: Path, use_registry: Callable[..., Any]) -> None:
    """to_values copies every result tensor to the host: on the CPU b's 32 MiB stay in the budget's memory
    through the later stage; planned for a GPU (a config alone, on the meta device) they leave the device
    as b finishes, and the plan says how much the host receives."""
    from transformers import LlamaConfig

    use_registry(HoldsB, KeepsLater)
    folder = tmp_path / "llama"
    LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                vocab_size=512).save_pretrained(folder)
    params = {"t.holds_b": {"results_mib": 32}, "t.keeps_later": {"state_mib": 16}}
    peaks = {}
    for device in ("cpu", "cuda"):
        (p,) = plan(str(folder), None, ["t.keeps_later"], params=params,
                    config=RunConfig(device=device, memory_budget="64GiB"))
        assert isinstance(p, ModelPlan)
        peaks[device] = [s.peak_bytes - p.weights_bytes for s in p.passes]
        assert p.host_results_bytes == (32 * MiB if device == "cuda" else 0)
    assert peaks["cpu"] == [32 * MiB, 16 * MiB + 32 * MiB]  # b's finalize makes its results; kept after
    assert peaks["cuda"] == [32 * MiB, 16 * MiB]  # made on the device, then copied to the host
