"""circuits.qkov_interference: the overlap maths on hand-made importances, through the metric's own
finalize with hand-made fisher.grouped HeadValues, its skip and missing-plugin paths, and an
end-to-end run that starts once fisher.grouped is registered."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensorscope_circuits.interference import InterferenceParams, QKOVInterference, interference

from tensorscope_core import HeadValue, MetricResult, RunConfig, RunShape, analyze
from tensorscope_core.plugin_api import NotApplicable, PreparedData
from tensorscope_core.testing import temporary_plugin

METRIC = "circuits.qkov_interference"


def test_shares_overlap_and_exclusive_heads():
    """Shares [.5,.5,0,0] and [0,.5,.5,0] (b scaled by 3 changes nothing): overlap [0,.5,0,0],
    total 0.5; important (share >= 2/4): a {0,1}, b {1,2}, so head 0 is a's only, head 2 b's."""
    found = interference({"a": np.array([[1.0, 1.0, 0.0, 0.0]]), "b": np.array([[0.0, 3.0, 3.0, 0.0]])}, 2.0)
    assert found.overlap.tolist() == [[0.0, 0.5, 0.0, 0.0]]
    assert found.important["a"].tolist() == [[True, True, False, False]]
    assert found.important["b"].tolist() == [[False, True, True, False]]
    same = interference({"a": np.ones((2, 3)), "b": 5 * np.ones((2, 3))}, 2.0)
    assert same.overlap.sum() == pytest.approx(1.0)
    disjoint = interference({"a": np.array([[1.0, 0.0]]), "b": np.array([[0.0, 1.0]])}, 2.0)
    assert disjoint.overlap.sum() == 0.0


def test_three_tasks_average_the_pairs():
    a, b, c = np.array([[1.0, 0.0]]), np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    found = interference({"a": a, "b": b, "c": c}, 1.0)
    assert np.allclose(found.overlap, [[1 / 3, 0.0]])  # pairs (a,b)=1, (a,c)=0, (b,c)=0 on head 0


def test_bad_importances_are_refused():
    with pytest.raises(ValueError, match="at least two tasks"):
        interference({"a": np.ones((1, 2))}, 2.0)
    with pytest.raises(ValueError, match="no positive Fisher importance"):
        interference({"a": np.ones((1, 2)), "b": np.zeros((1, 2))}, 2.0)


def fake_grouped(qk: dict[str, list[list[float]]], ov: dict[str, list[list[float]]]) -> MetricResult:
    values = {f"true/{t}/head_qk": HeadValue(values=v) for t, v in qk.items()}
    values |= {f"true/{t}/head_ov": HeadValue(values=v) for t, v in ov.items()}
    return MetricResult(metric="fisher.grouped", version="1", plugin="fake", status="ok", values=values)


def test_metric_finalize_on_hand_made_fisher_results():
    """Layer 1 head 0 carries both tasks' QK importance; OV importance is disjoint."""
    # QK shares: math .125, .125, .75, 0; code 0, 1/6, 2/3, 1/6
    qk = {"math": [[1.0, 1.0], [6.0, 0.0]], "code": [[0.0, 2.0], [8.0, 2.0]]}
    ov = {"math": [[1.0, 0.0], [0.0, 0.0]], "code": [[0.0, 0.0], [0.0, 4.0]]}
    shape = RunShape(4, 8, 2, 8, ("math", "code"), 0)
    metric = QKOVInterference(InterferenceParams(), shape, None, {"fisher.grouped": fake_grouped(qk, ov)})
    out = metric.finalize()
    want_qk = np.minimum(np.array(qk["math"]) / 8, np.array(qk["code"]) / 12)
    assert np.allclose(out["overlap_qk"].values, want_qk)
    assert out["task_overlap_qk"] == pytest.approx(want_qk.sum())
    assert out["task_overlap_ov"] == 0.0
    top = out["ranking"].rows[0]
    assert top[:3] == [1, 0, "qk"] and top[4:] == pytest.approx([0.75, 8 / 12])
    assert out["ranking"].columns[-2:] == ["share/math", "share/code"]
    exclusive = {(r[0], r[1], r[2], r[3]) for r in out["exclusive"].rows}
    assert (0, 0, "ov", "math") in exclusive and (1, 1, "ov", "code") in exclusive
    assert (1, 0, "qk", "math") not in exclusive  # important to both tasks


def test_missing_field_names_what_is_there():
    shape = RunShape(4, 8, 2, 8, ("math", "code"), 0)
    grouped = fake_grouped({"math": [[1.0]]}, {"math": [[1.0]]})
    metric = QKOVInterference(InterferenceParams(), shape, None, {"fisher.grouped": grouped})
    with pytest.raises(NotApplicable, match="true/code/head_qk") as caught:
        metric.finalize()
    assert "--rung fisher.diagonal=asked" in caught.value.fix


def test_a_pooled_fisher_diagonal_skips_it_naming_the_rung(models):
    """fisher.diagonal at its 'pooled' rung (what the planner picks under a tight budget, as on the 135M
    shape at 16 GiB) keeps no per-task fields: the metric ends skipped saying why and how to fix it (it
    ended in a KeyError)."""
    with temporary_plugin() as registry:
        if "fisher.grouped" not in registry.metrics:
            pytest.skip("fisher.grouped is not registered (the tensorscope-fisher plugin provides it)")
        gen = torch.Generator().manual_seed(0)
        data = {task: torch.randint(5, 300, (4, 12), generator=gen) for task in ("math", "code")}
        pooled = RunConfig(rungs={"fisher.diagonal": "pooled"})
        res = analyze(models["gpt2"], data=data, metrics=[METRIC], config=pooled)
    result = res.get(METRIC)
    assert result.status == "skipped", (result.status, result.reason)
    assert "'pooled' memory rung" in result.reason and "true/math/head_qk" in result.reason


def test_skipped_without_two_tasks():
    rows = [torch.arange(5, 12)]
    untasked = PreparedData({None: rows}, batch_size=4, pad_token_id=0)
    one_task = PreparedData({"math": rows}, batch_size=4, pad_token_id=0)
    for data in (untasked, one_task, None):
        reason = QKOVInterference.skip_reason(InterferenceParams(), None, data)  # type: ignore[arg-type]
        assert reason is not None and "two named tasks" in reason
    two = PreparedData({"math": rows, "code": rows}, batch_size=4, pad_token_id=0)
    assert QKOVInterference.skip_reason(InterferenceParams(), None, two) is None  # type: ignore[arg-type]


def test_without_the_fisher_plugin_the_error_says_what_to_install(models):
    ids = torch.randint(5, 300, (4, 8), generator=torch.Generator().manual_seed(0))
    with temporary_plugin(only_installed=["circuits"]) as registry:
        assert "fisher.grouped" not in registry.metrics
        result = analyze(models["gpt2"], data={"a": ids, "b": ids}, metrics=[METRIC]).get(METRIC)
    assert result.status == "error" and result.error_type == "Unavailable"
    assert "pip install 'tensorscope[fisher]'" in result.reason


def test_end_to_end_with_the_fisher_plugin(models):
    """Runs once fisher.grouped is registered: the overlaps are the pairwise minima of the shares of
    the fisher plugin's own per-task head fields."""
    with temporary_plugin() as registry:
        if "fisher.grouped" not in registry.metrics:
            pytest.skip("fisher.grouped is not registered (the tensorscope-fisher plugin provides it)")
        gen = torch.Generator().manual_seed(0)
        data = {task: torch.randint(5, 300, (8, 12), generator=gen) for task in ("math", "code")}
        res = analyze(models["llama"], data=data, metrics=[METRIC])
    result, grouped = res.get(METRIC), res.get("fisher.grouped")
    assert result.ok, result.reason
    for part in ("qk", "ov"):
        shares = []
        for task in ("math", "code"):
            value = grouped.values[f"true/{task}/head_{part}"]
            grid = np.array(value.values if isinstance(value, HeadValue) else res.tensor("fisher.grouped",
                                                                                          f"true/{task}/head_{part}"))
            shares.append(grid / grid.sum())
        assert np.allclose(result.value(f"overlap_{part}"), np.minimum(*shares), rtol=1e-9)
