"""The run fits its memory budget: the machine's budget by default, metrics stepped down their
ladders (most accurate rung that fits, recorded in the result), pinned rungs, metrics left out with
the reason and the fix, and a refusal only when nothing fits or with strict_budget."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import Field

from tensorscope_core import Metric, Params, RunConfig, Step, analyze, plan
from tensorscope_core import machine as machine_mod
from tensorscope_core.errors import BadParameterError, PlanDoesNotFitError
from tensorscope_core.example_store import GradientStore, scratch_root
from tensorscope_core.metric import Rung
from tensorscope_core.scheduler.plan import ModelPlan

GiB = 2**30


class WidthParams(Params):
    width: int = Field(4096, ge=1)


class Rows(Metric):
    """Holds ``width`` float64 numbers; its value is their count, so the rung it ran at is visible."""

    name = "t.rows"
    artifacts = ("weights",)
    Params = WidthParams

    @classmethod
    def cost(cls, params: WidthParams, view: Any, shape: Any) -> Any:
        from tensorscope_core.results.schema import Cost

        return Cost(state_bytes=8 * params.width)

    @classmethod
    def ladder(cls, params: WidthParams, view: Any, shape: Any) -> Sequence[Rung]:
        return [Rung("half", WidthParams(width=params.width // 2), "half the entries"),
                Rung("quarter", WidthParams(width=params.width // 4), "a quarter of the entries")]

    def setup(self) -> None:
        self.held = torch.ones(self.params.width, dtype=torch.float64)

    def finalize(self) -> dict[str, float]:
        return {"count": float(self.held.sum())}


class SmallRows(Rows):
    name = "t.small_rows"

    @classmethod
    def ladder(cls, params: WidthParams, view: Any, shape: Any) -> Sequence[Rung]:
        return [Rung("half", WidthParams(width=params.width // 2), "half the entries")]


class Fixed(Rows):
    """No ladder: as asked or left out."""

    name = "t.fixed"

    @classmethod
    def ladder(cls, params: WidthParams, view: Any, shape: Any) -> Sequence[Rung]:
        return ()


class NeedsFixed(Metric):
    name = "t.needs_fixed"
    artifacts = ("weights",)
    requires_metrics = ("t.fixed",)

    def finalize(self) -> dict[str, float]:
        return {"x": 1.0}


def _model_plan(folder: str, metrics: list[str], **config: Any) -> ModelPlan:
    (p,) = plan(folder, None, metrics, config=RunConfig(**config))
    assert isinstance(p, ModelPlan)
    return p


@pytest.fixture
def gpt2(model_dirs: dict[str, Path], use_registry: Callable[..., Any]) -> str:
    use_registry(Rows, SmallRows, Fixed, NeedsFixed)
    return str(model_dirs["gpt2"])


def test_the_default_budget_is_the_machines_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine_mod, "_meminfo_available", lambda: 10 * GiB)
    monkeypatch.setattr(machine_mod, "_cgroup_room", lambda: None)
    budget = RunConfig().budget()
    assert budget.nbytes == 9 * GiB  # 10% margin
    assert "available RAM (10.0 GiB) less 1.0 GiB" in budget.source
    monkeypatch.setattr(machine_mod, "_cgroup_room", lambda: 2 * GiB)  # a container's limit is tighter
    assert RunConfig().budget().nbytes == 2 * GiB - 512 * 2**20  # the margin is at least 512 MiB
    assert RunConfig(memory_budget="3GiB").budget().nbytes == 3 * GiB


def test_the_plan_says_where_the_default_budget_came_from(gpt2: str) -> None:
    p = _model_plan(gpt2, ["t.rows"])
    assert p.budget_source.startswith("available RAM") and p.fits
    assert "available RAM" in p.render().splitlines()[0]


def test_an_over_budget_metric_steps_down_to_the_most_accurate_rung_that_fits(gpt2: str) -> None:
    full = _model_plan(gpt2, ["t.rows"], memory_budget="64GiB")
    assert full.rungs == {} and full.declared_state == {"t.rows": 8 * 4096}
    budget = full.peak_bytes - 8 * 4096 // 4  # half fits (saves 1/2), asked does not
    p = _model_plan(gpt2, ["t.rows"], memory_budget=budget)
    assert p.fits and p.declared_state == {"t.rows": 8 * 2048}
    assert p.rungs == {"t.rows": "half (half the entries; budget)"}
    assert "rung t.rows: half" in p.render()

    res = analyze(gpt2, None, ["t.rows"], config=RunConfig(memory_budget=budget))
    result = res.get("t.rows")
    assert result.ok and result.value("count") == 2048.0
    assert result.rung is not None and (result.rung.name, result.rung.chosen_by) == ("half", "budget")
    assert result.params == {"width": 2048} and result.declared_bytes == result.measured_bytes == 8 * 2048


def test_only_the_metric_whose_step_saves_most_is_stepped(gpt2: str) -> None:
    params = {"t.small_rows": {"width": 1024}}
    (full,) = plan(gpt2, None, ["t.rows", "t.small_rows"], params=params, config=RunConfig(memory_budget="64GiB"))
    budget = full.peak_bytes - 8 * 1024  # either half step would do: the larger saving is taken, and enough
    (p,) = plan(gpt2, None, ["t.rows", "t.small_rows"], params=params, config=RunConfig(memory_budget=budget))
    assert isinstance(p, ModelPlan) and p.fits
    assert p.declared_state == {"t.rows": 8 * 2048, "t.small_rows": 8 * 1024}
    assert list(p.rungs) == ["t.rows"]


def test_a_pinned_rung_is_used_whatever_the_budget(gpt2: str) -> None:
    res = analyze(gpt2, None, ["t.rows"], config=RunConfig(memory_budget="64GiB", rungs={"t.rows": "quarter"}))
    result = res.get("t.rows")
    assert result.value("count") == 1024.0 and result.rung is not None and result.rung.chosen_by == "pinned"
    tight = _model_plan(gpt2, ["t.rows"], memory_budget="64GiB").peak_bytes - 8
    p = _model_plan(gpt2, ["t.rows"], memory_budget=tight, rungs={"t.rows": "asked"})
    assert p.fits and not p.rungs and "t.rows" in p.left_out  # pinned as asked: left out, never stepped down


def test_bad_pins_are_refused_with_the_choices(gpt2: str) -> None:
    with pytest.raises(BadParameterError, match="t.rows has no rung 'tenth'") as info:
        _model_plan(gpt2, ["t.rows"], rungs={"t.rows": "tenth"})
    assert "asked, half, quarter" in info.value.fix
    with pytest.raises(BadParameterError, match="does not compute"):
        _model_plan(gpt2, ["t.rows"], rungs={"t.fixed": "asked"})


def test_what_cannot_fit_is_left_out_and_the_rest_runs(gpt2: str) -> None:
    metrics = ["t.rows", "t.fixed", "t.needs_fixed"]
    params = {"t.fixed": {"width": 1 << 20}}
    alone = _model_plan(gpt2, ["t.rows"], memory_budget="64GiB").peak_bytes
    res = analyze(gpt2, None, metrics, params=params, config=RunConfig(memory_budget=alone + 64))
    assert res.get("t.rows").ok and res.get("t.rows").rung is None  # as asked, beside nothing else
    fixed = res.get("t.fixed")
    assert fixed.status == "skipped" and fixed.reason is not None
    assert fixed.reason.startswith("left out for memory:")
    # alone it is over budget too: the fix is a larger budget (weights + its 8 MiB), not running it alone
    assert "alone the plan needs 8.1 MiB" in fixed.reason
    assert "raise --memory-budget to at least 8.1 MiB" in fixed.reason
    dependent = res.get("t.needs_fixed")
    assert dependent.status == "skipped" and "needs 't.fixed'" in (dependent.reason or "")


def test_strict_budget_refuses_instead_of_stepping(gpt2: str) -> None:
    budget = _model_plan(gpt2, ["t.rows"], memory_budget="64GiB").peak_bytes - 8
    with pytest.raises(PlanDoesNotFitError) as info:
        analyze(gpt2, None, ["t.rows"], config=RunConfig(memory_budget=budget, strict_budget=True))
    assert info.value.exit_code == 3 and "strict_budget" in str(info.value)


def test_nothing_fits_is_still_refused(gpt2: str) -> None:
    with pytest.raises(PlanDoesNotFitError, match="every metric left out"):
        analyze(gpt2, None, ["t.rows"], config=RunConfig(memory_budget=1024))


class DiskRows(Metric):
    """Keeps two rows of ones per batch in a disk-backed store; its value is their Gram sum."""

    name = "t.disk_rows"
    artifacts = ("token_loss",)
    folders: list[Path] = []

    def setup(self) -> None:
        self.store = GradientStore(100, backing="disk")

    def update(self, step: Step) -> None:
        self.store.add(torch.ones(2, 100))
        DiskRows.folders.append(next(scratch_root().iterdir()))

    def finalize(self) -> dict[str, float]:
        return {"gram_sum": float(self.store.gram().sum())}


def test_disk_backed_state_lives_under_the_cache_dir_and_goes_with_the_run(
        model_dirs: dict[str, Path], use_registry: Callable[..., Any], tokens: torch.Tensor, tmp_path: Path) -> None:
    use_registry(DiskRows)
    cache = tmp_path / "cache"
    DiskRows.folders.clear()
    res = analyze(str(model_dirs["gpt2"]), tokens, ["t.disk_rows"], config=RunConfig(batch_size=4, cache_dir=cache))
    n_rows = 2 * 3  # three batches
    assert res.get("t.disk_rows").value("gram_sum") == n_rows * n_rows * 100.0
    assert DiskRows.folders and all(f.parent == cache / "scratch" for f in DiskRows.folders)
    assert not (cache / "scratch").exists()  # the store's folder went with the metric, then the scratch dir


class BadCost(Rows):
    name = "t.bad_cost"

    @classmethod
    def cost(cls, params: WidthParams, view: Any, shape: Any) -> Any:
        raise ZeroDivisionError("a plugin bug")


def test_a_metric_whose_declaration_raises_is_left_out_not_the_run(gpt2: str, use_registry: Callable[..., Any]) -> None:
    use_registry(Rows, BadCost)
    res = analyze(gpt2, None, ["t.rows", "t.bad_cost"], config=RunConfig(memory_budget="1GiB"))
    assert res.get("t.rows").ok
    bad = res.get("t.bad_cost")
    assert bad.status == "skipped" and "declared cost raised ZeroDivisionError: a plugin bug" in (bad.reason or "")


class GradReader(Metric):
    """Reads the parameters' gradients (as basic.grad_norms does), holds nothing."""

    name = "t.grad_reader"
    artifacts = ("param_grad",)

    def finalize(self) -> dict[str, float]:
        return {"x": 1.0}


def test_a_shared_artifact_goes_with_all_its_readers_and_nothing_else(
        model_dirs: dict[str, Path], use_registry: Callable[..., Any], tokens: torch.Tensor) -> None:
    use_registry(GradReader)
    folder = str(model_dirs["gpt2"])
    (forward_only,) = plan(folder, tokens, ["basic.loss"], config=RunConfig(batch_size=4, memory_budget="1GiB"))
    metrics = ["basic.grad_norms", "t.grad_reader", "basic.loss"]
    config = RunConfig(batch_size=4, memory_budget=forward_only.peak_bytes + 1024)
    (p,) = plan(folder, tokens, metrics, config=config)
    assert isinstance(p, ModelPlan) and p.fits
    # leaving out one reader of param_grad saves nothing (the backward still runs): both go, the loss stays
    assert sorted(p.left_out) == ["basic.grad_norms", "t.grad_reader"]
    assert all("the 'param_grad' artifact it reads" in why for why in p.left_out.values())
    res = analyze(folder, tokens, metrics, config=config)
    assert res.get("basic.loss").ok and res.get("t.grad_reader").status == "skipped"


class TwiceNamed(Rows):
    name = "t.twice_named"

    @classmethod
    def ladder(cls, params: WidthParams, view: Any, shape: Any) -> Sequence[Rung]:
        return [Rung("half", params, "x"), Rung("half", params, "y")]


def test_a_malformed_ladder_runs_as_asked_and_the_plan_says_why(gpt2: str, use_registry: Callable[..., Any]) -> None:
    use_registry(TwiceNamed)
    p = _model_plan(gpt2, ["t.twice_named"], memory_budget="1GiB")
    assert any("t.twice_named: its memory ladder failed" in n and "named once each" in n for n in p.notes)
    res = analyze(gpt2, None, ["t.twice_named"], config=RunConfig(memory_budget="1GiB"))
    assert res.get("t.twice_named").ok and res.get("t.twice_named").rung is None


class CostParams(Params):
    state_mib: int = Field(0, ge=0)
    working_mib: int = Field(0, ge=0)


class Declares(Metric):
    """Declares ``state_mib`` held and ``working_mib`` of working memory (planned only)."""

    name = "t.declares_x"
    artifacts = ("weights",)
    Params = CostParams

    @classmethod
    def cost(cls, params: CostParams, view: Any, shape: Any) -> Any:
        from tensorscope_core.results.schema import Cost

        return Cost(state_bytes=params.state_mib * 2**20, transient_bytes=params.working_mib * 2**20)

    def finalize(self) -> dict[str, float]:
        return {"x": 1.0}


class DeclaresY(Declares):
    name = "t.declares_y"


class DeclaresW(Declares):
    name = "t.declares_w"


def test_what_was_left_out_early_comes_back_when_a_later_choice_made_room(
        model_dirs: dict[str, Path], use_registry: Callable[..., Any]) -> None:
    """x holds 5 MiB, y and w need 10 and 9 MiB of working memory (only the largest counts), 8 MiB free.
    Nothing alone fits at first, so x (the most bytes per metric) goes, then y, then w; with both gone
    x fits again and comes back: one metric runs, not none."""
    use_registry(Declares, DeclaresY, DeclaresW)
    folder = str(model_dirs["gpt2"])
    base = _model_plan(folder, ["t.declares_x"], memory_budget="64GiB").peak_bytes
    params = {"t.declares_x": {"state_mib": 5}, "t.declares_y": {"working_mib": 10},
              "t.declares_w": {"working_mib": 9}}
    (p,) = plan(folder, None, ["t.declares_x", "t.declares_y", "t.declares_w"], params=params,
                config=RunConfig(memory_budget=base + 8 * 2**20))
    assert isinstance(p, ModelPlan) and p.fits
    assert sorted(p.left_out) == ["t.declares_w", "t.declares_y"]


class ReadsLogits(Declares):
    name = "t.reads_logits_x"
    artifacts = ("logits",)


class ReadsLoss(Declares):
    name = "t.reads_loss_y"
    artifacts = ("token_loss",)


class ReadsLossW(ReadsLoss):
    name = "t.reads_loss_w"


def test_the_fewest_metrics_that_make_room_are_left_out(
        model_dirs: dict[str, Path], use_registry: Callable[..., Any]) -> None:
    """In one forward pass x needs 64 MiB of working memory, y and w read one artifact and hold 40 MiB each.
    Leaving out y and w (and their artifact) lowers the peak most, but leaving out x alone is enough: two
    metrics run, not one."""
    use_registry(ReadsLogits, ReadsLoss, ReadsLossW)
    folder = str(model_dirs["gpt2"])
    base = _model_plan(folder, ["t.reads_loss_y", "t.reads_loss_w"], memory_budget="64GiB").peak_bytes
    params = {"t.reads_logits_x": {"working_mib": 64}, "t.reads_loss_y": {"state_mib": 40},
              "t.reads_loss_w": {"state_mib": 40}}
    (p,) = plan(folder, None, ["t.reads_logits_x", "t.reads_loss_y", "t.reads_loss_w"], params=params,
                config=RunConfig(memory_budget=base + 81 * 2**20))
    assert isinstance(p, ModelPlan) and p.fits
    assert list(p.left_out) == ["t.reads_logits_x"]
