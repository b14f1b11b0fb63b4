"""dynamics.phase_transitions: PELT change points against the spec's known series, through the
scheduler on checkpoint sets, and the report's marked interval."""

from __future__ import annotations

import math

import numpy as np
import pytest
import ruptures as rpt
from scipy.stats import median_abs_deviation
from series_metric import series_metric
from tensorscope_dynamics.changepoints import detect, penalty
from tensorscope_dynamics.checkpoints import order_checkpoints

from tensorscope_core import RunConfig, analyze
from tensorscope_core.plugin_api import BadParameterError, order_models
from tensorscope_core.testing import random_token_data, temporary_plugin

DEMO_STEPS = (0, 25, 50, 75, 100, 300)
DEMO_LOSS = (4.18, 4.10, 3.99, 2.83, 2.36, 2.02)  # the spec's demo checkpoints
IDS = random_token_data(64, n=2, length=4)


def _run(folder, values, params, layers=None, names=None):
    names = names or list(values)
    with temporary_plugin("scratch", metrics=[series_metric(values, layers)]) as registry:
        return analyze(
            {n: folder for n in names},
            data=IDS,
            metrics=["dynamics.phase_transitions"],
            params={"dynamics.phase_transitions": params},
            config=RunConfig(batch_size=2),
            registry=registry,
        )


def _rows(result):
    table = result.value("changes")
    return [dict(zip(table.columns, row, strict=True)) for row in table.rows]


def test_step_series_changes_at_index_10():
    """Spec: [0]*10 + [5]*10 -> one change, at index 10."""
    found = detect([0.0] * 10 + [5.0] * 10)
    assert [c.index for c in found] == [10]
    assert (found[0].mean_before, found[0].mean_after) == (0.0, 5.0)


def test_penalty_is_two_sigma_squared_log_n_with_mad_sigma():
    """Independent reference: sigma = scipy's normal-scaled MAD of the first differences / sqrt(2)."""
    y = np.array(DEMO_LOSS)
    sigma = median_abs_deviation(np.diff(y), scale="normal") / math.sqrt(2)
    assert penalty(y) == pytest.approx(2 * sigma**2 * math.log(len(y)), rel=1e-4)  # 1.4826 vs 1/Phi^-1(3/4)
    noisy = np.random.default_rng(0).normal(size=40) + np.r_[np.zeros(20), 3 * np.ones(20)]
    want = rpt.Pelt(model="l2", min_size=2, jump=1).fit(noisy.reshape(-1, 1)).predict(pen=penalty(noisy))[:-1]
    assert [c.index for c in detect(noisy.tolist())] == want and 20 in want  # the spec's BIC-like penalty


def test_demo_series_change_lies_between_steps_50_and_100(bare_gpt2):
    """Spec: the demo's loss 4.18 .. 2.02 at steps 0/25/50/75/100/300 changes between steps 50 and 100."""
    names = [f"step-{s:04d}" for s in DEMO_STEPS]
    res = _run(bare_gpt2, dict(zip(names, DEMO_LOSS, strict=True)), {"series": ["scratch.series.value"]})
    result = res.get("dynamics.phase_transitions")
    rows = _rows(result)
    assert len(rows) == 1 and result.value("n_changes") == 1
    row = rows[0]
    assert 50 <= row["step_before"] < row["step_after"] <= 100
    assert (row["step_before"], row["step_after"], row["index"]) == (50, 75, 3)
    assert row["step_at"] == pytest.approx(math.expm1((math.log1p(50) + math.log1p(75)) / 2))  # uneven: log step
    before, after = np.array(DEMO_LOSS[:3]), np.array(DEMO_LOSS[3:])
    pooled = math.sqrt((before.var(ddof=1) * 2 + after.var(ddof=1) * 2) / 4)
    assert row["size_sd"] == pytest.approx((after.mean() - before.mean()) / pooled)


def test_the_report_marks_the_interval(bare_gpt2, tmp_path):
    pytest.importorskip("matplotlib")
    from tensorscope_dynamics.report import dynamics_section

    from tensorscope_core.report import generate_html_report

    names = [f"step-{s:04d}" for s in DEMO_STEPS]
    res = _run(bare_gpt2, dict(zip(names, DEMO_LOSS, strict=True)), {"series": ["scratch.series.value"]})
    html = dynamics_section(res)
    assert html is not None and "shaded: the step interval" in html and "<td>step-0050</td><td>step-0075</td>" in html
    assert "Training dynamics" in generate_html_report(res, tmp_path / "report.html").read_text()


@pytest.mark.parametrize(
    "names",
    [
        ["step-0300", "step-0050", "step-0100"],
        ["final/", "ckpt_step_5000/", "ckpt_step_1000/"],
        ["ckpt-a", "ckpt-b", "step-5"],
        ["gpt2", "llama-7b", "split3"],
        ["runs/step-100/model", "runs/step-20/model", "last"],
    ],
)
def test_members_are_ordered_as_compare_orders_them(names):
    """The core's order_models decides (compare()'s rule); steps are used only where every member has one."""
    core = order_models(names)
    ckpts = order_checkpoints(names, None)
    assert ckpts.names == core.names
    known = all(s is not None for s in core.steps)
    assert ckpts.by_step == known
    assert ckpts.steps == ([float(s) for s in core.steps] if known else [0.0, 1.0, 2.0])


def test_given_steps_override_the_names():
    ckpts = order_checkpoints(["final", "step-2000", "step-100"], {"final": 5000})
    assert (ckpts.names, ckpts.steps, ckpts.by_step) == (["step-100", "step-2000", "final"], [100, 2000, 5000], True)
    ckpts = order_checkpoints(["ckpt-a", "ckpt-b", "step-5"], {"ckpt-a": 10})  # ckpt-b has none: given order
    assert (ckpts.names, ckpts.steps, ckpts.by_step) == (["ckpt-a", "ckpt-b", "step-5"], [0, 1, 2], False)
    with pytest.raises(BadParameterError):
        order_checkpoints(["step-1", "step-2"], {"step-3": 3})


def test_per_layer_series_and_given_steps(bare_gpt2):
    """A per-layer field gives one series per layer; the steps parameter orders the members."""
    names = [f"ckpt-{c}" for c in "abcdefgh"]
    flat, jump = [1.0] * 8, [0.0] * 4 + [2.0] * 4
    layers = {n: [flat[i], jump[i]] for i, n in enumerate(names)}
    steps = {n: float(10 * (7 - i)) for i, n in enumerate(names)}  # reversed: the jump goes 2 -> 0
    res = _run(
        bare_gpt2,
        dict(zip(names, flat, strict=True)),
        {"series": ["scratch.series.layers"], "steps": steps},
        layers=layers,
    )
    result = res.get("dynamics.phase_transitions")
    rows = _rows(result)
    assert [(r["series"], r["step_before"], r["step_after"]) for r in rows] == [("scratch.series.layers[1]", 30, 40)]
    assert (rows[0]["mean_before"], rows[0]["mean_after"]) == (2.0, 0.0) and rows[0]["step_at"] == 35
    assert result.value("not_searched").rows[0][0] == "scratch.series.layers[0]"  # flat: nothing to search


def test_default_searches_the_loss_and_every_scalar(bare_gpt2):
    names = [f"step-{s}" for s in (1, 2, 3, 4)]
    res = analyze(
        {n: bare_gpt2 for n in names}, data=IDS, metrics=["dynamics.phase_transitions"], config=RunConfig(batch_size=2)
    )
    result = res.get("dynamics.phase_transitions")
    assert result.ok, result.reason
    searched = {r[0] for r in result.value("not_searched").rows}  # identical models: constant series
    assert {"basic.loss.loss", "basic.loss.perplexity"} <= searched and result.value("n_changes") == 0


def test_too_few_checkpoints_and_bad_parameters(bare_gpt2):
    res = analyze({"a": bare_gpt2, "b": bare_gpt2}, data=IDS, metrics=["dynamics.phase_transitions"])
    result = res.get("dynamics.phase_transitions")
    assert result.status == "skipped" and "at least 4 checkpoints" in result.reason
    with pytest.raises(BadParameterError):
        analyze(
            bare_gpt2,
            data=IDS,
            metrics=["dynamics.phase_transitions"],
            params={"dynamics.phase_transitions": {"series": ["loss"]}},
        )
