"""Declared memory against what a run holds: the audit instrument on known allocations, the plan's
working-memory term, and (marker ``realshape``) every metric on the 135M-shaped LLaMA."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import Field

from tensorscope_core import RunConfig, plan
from tensorscope_core.demo import demo_params
from tensorscope_core.memory_audit import FLOOR_BYTES, MemoryAudit, audit, audit_set
from tensorscope_core.plugin_api import Cost, Metric, ModelSetMetric, ModelView, Params, RunShape, ScalarValue
from tensorscope_core.plugins import get_registry
from tensorscope_core.testing import REAL_135M, SMALL_DATA_PARAMS, real_shaped_llama, temporary_plugin

MIB = 2**20


class AllocParams(Params):
    allocate_mib: int = Field(256, ge=0)
    declare_mib: int = Field(256, ge=0)
    #: MiB of a tensor finalize returns (kept with the results to the end of the run)
    return_mib: int = Field(0, ge=0)


class Allocates(Metric):
    """Holds ``allocate_mib`` of working memory in finalize and declares ``declare_mib``."""

    name = "probe.allocates"
    version = "1"
    summary = "allocates a known block"
    Params = AllocParams
    artifacts = ("weights",)
    fields = {"total": "sum of the block (every entry 1)", "kept": "a block of ones kept with the results"}

    @classmethod
    def cost(cls, params: AllocParams, view: ModelView, shape: RunShape) -> Cost:
        return Cost(transient_bytes=params.declare_mib * MIB)

    def finalize(self) -> dict[str, Any]:
        block = torch.ones(self.params.allocate_mib * MIB // 4)
        kept = {"kept": torch.ones(self.params.return_mib * MIB // 4)} if self.params.return_mib else {}
        return {"total": ScalarValue(value=float(block.sum())), **kept}


class SetAllocates(ModelSetMetric):
    """The model-set stage's probe: holds ``allocate_mib`` in compute_set and declares ``declare_mib``."""

    name = "probe.set_allocates"
    version = "1"
    summary = "allocates a known block over the model set"
    Params = AllocParams
    fields = {"total": "sum of the block (every entry 1)"}

    @classmethod
    def cost(cls, params: AllocParams, view: ModelView, shape: RunShape) -> Cost:
        return Cost(transient_bytes=params.declare_mib * MIB)

    def compute_set(self, views: Any, results: Any) -> dict[str, Any]:
        block = torch.ones(self.params.allocate_mib * MIB // 4)
        return {"total": ScalarValue(value=float(block.sum()))}


def _tiny() -> torch.nn.Module:
    return real_shaped_llama(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, vocab_size=512)


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))


CONFIG = RunConfig(batch_size=2, max_length=32, memory_budget="8GiB")


def _audit_probe(allocate: int, declare: int, returned: int = 0) -> MemoryAudit:
    model, tiny = _tiny(), _tiny()
    asked = {"allocate_mib": allocate, "declare_mib": declare, "return_mib": returned}
    with temporary_plugin("probe", metrics=[Allocates]):
        [row] = audit(model, _tokens(512), ["probe.allocates"], config=CONFIG, warm_up=tiny,
                      warm_up_data=_tokens(512), params={"probe.allocates": asked})
    return row


def test_the_audit_sees_a_known_block_of_working_memory() -> None:
    row = _audit_probe(allocate=256, declare=256)
    assert abs(row.held_peak - 256 * MIB) <= 0.05 * 256 * MIB, row.line()
    assert row.ok


def test_an_under_declared_block_is_flagged() -> None:
    row = _audit_probe(allocate=256, declare=64)
    assert row.held_peak > 200 * MIB and not row.ok, row.line()


def test_results_the_run_keeps_are_declared_and_checked() -> None:
    """128 MiB of results declared as working memory: the peak agrees, the results held do not."""
    row = _audit_probe(allocate=0, declare=128, returned=128)
    assert row.held_results == 128 * MIB and row.agrees(row.declared_peak, row.held_peak), row.line()
    assert not row.ok


def test_small_quantities_compare_by_the_floor() -> None:
    assert MemoryAudit.agrees(0, FLOOR_BYTES) and not MemoryAudit.agrees(0, FLOOR_BYTES + 1)
    assert MemoryAudit.agrees(1000 * MIB, 1150 * MIB) and not MemoryAudit.agrees(1000 * MIB, 1151 * MIB)


def test_the_plan_adds_working_memory_and_names_the_heaviest_metrics() -> None:
    model = _tiny()
    with temporary_plugin("probe", metrics=[Allocates]):
        small = plan(model, _tokens(512), ["probe.allocates"], config=CONFIG,
                     params={"probe.allocates": {"declare_mib": 1}})[0]
        large = plan(model, _tokens(512), ["probe.allocates"], config=CONFIG,
                     params={"probe.allocates": {"declare_mib": 300}})[0]
    assert large.peak_bytes - small.peak_bytes == 299 * MIB
    assert large.declared_transient == {"probe.allocates": 300 * MIB}
    assert "probe.allocates" in large.render().split("largest declared memory by metric")[1]


def test_the_set_audit_measures_the_model_set_stage_alone() -> None:
    """The members' own runs come before the stage and are not counted: 256 MiB held in compute_set."""
    members = {"a": _tiny(), "b": _tiny()}
    warm = {"a": _tiny(), "b": _tiny()}
    with temporary_plugin("probe", metrics=[SetAllocates]):
        [row] = audit_set(members, _tokens(512), ["probe.set_allocates"], config=CONFIG, warm_up=warm,
                          warm_up_data=_tokens(512), params={"probe.set_allocates": {"declare_mib": 256}})
        [under] = audit_set(members, _tokens(512), ["probe.set_allocates"], config=CONFIG, warm_up=warm,
                            warm_up_data=_tokens(512), params={"probe.set_allocates": {"declare_mib": 64}})
        stage = plan(members, _tokens(512), ["probe.set_allocates"], config=CONFIG)[-1]
    assert row.declared_peak == 256 * MIB and abs(row.held_peak - 256 * MIB) <= 0.05 * 256 * MIB, row.line()
    assert row.ok and not under.ok, under.line()
    assert stage.transient_bytes == 256 * MIB and "working memory 256.0 MiB" in stage.render()


# -- every metric on the 135M-shaped model --------------------------------------------------

def _settings(names: list[str]) -> dict[str, dict[str, Any]]:
    """The demo's settings, and for the few metrics that need more data than 2 x 32 tokens a task, smaller ones."""
    return {**demo_params(names), **{m: p for m, p in SMALL_DATA_PARAMS.items() if m in names}}


def _tasks(vocab: int) -> dict[str, torch.Tensor]:
    """Two tasks, so the metrics that compare tasks or hold out a test split run too."""
    gen = torch.Generator().manual_seed(0)
    return {task: torch.randint(0, vocab, (2, 32), generator=gen) for task in ("train", "test")}


@pytest.mark.realshape
def test_every_metric_declares_what_it_holds_on_the_135m_shape() -> None:
    """Each metric alone, at the demo's settings (the research defaults of the replaying metrics take
    hours here; smaller ones where 2 x 32 tokens a task are too few), on two tasks of 2 x 32 tokens of the
    135M-shaped LLaMA. One that errors, is skipped or holds other than it declares fails."""
    names = sorted(n for n, cls in get_registry().metrics.items() if cls.scope == "model")
    rows = audit(real_shaped_llama(), _tasks(REAL_135M["vocab_size"]), names, params=_settings(names),
                 config=RunConfig(batch_size=2, max_length=32, memory_budget="20GiB"), warm_up=_tiny(),
                 warm_up_data=_tasks(512), progress=lambda r: print(r.line(), flush=True))
    assert all(r.ok for r in rows), "\n".join(r.line() for r in rows if not r.ok)


@pytest.mark.realshape
def test_every_model_set_metric_declares_what_it_holds_on_the_135m_shape() -> None:
    """Each model-set metric alone over a base and three other models of the 135M shape (random weights, four
    seeds: four checkpoints, as a change-point search needs), on the same two tasks: the set stage's declared
    state, working memory and results against what it held."""
    names = sorted(n for n, cls in get_registry().metrics.items() if cls.scope == "model_set")
    members = {name: real_shaped_llama(seed=seed) for seed, name in enumerate("abc", 1)}
    rows = audit_set(members, _tasks(REAL_135M["vocab_size"]), names, base=real_shaped_llama(),
                     params=_settings(names), config=RunConfig(batch_size=2, max_length=32, memory_budget="20GiB"),
                     warm_up={name: _tiny() for name in "abc"}, warm_up_base=_tiny(), warm_up_data=_tasks(512),
                     progress=lambda r: print(r.line(), flush=True))
    assert all(r.ok for r in rows), "\n".join(r.line() for r in rows if not r.ok)
