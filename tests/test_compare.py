"""Comparisons across models and checkpoints, and correlation discovery, on synthetic results
with planted answers (known differences, trends and correlations) and on null data."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
from core_helpers import synthetic_record

from tensorscope_core import Results, report
from tensorscope_core.checkpoints import order_models, step_of
from tensorscope_core.compare import compare
from tensorscope_core.discovery import discover_correlations
from tensorscope_core.errors import UsageError
from tensorscope_core.results.schema import HeadValue, LayerValue, ScalarValue
from tensorscope_core.stats import InsufficientSampleWarning

pytestmark = pytest.mark.usefixtures("basic_only")


# -- checkpoint order --------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "step"), [
    ("ckpt_step_1000/", 1000), ("checkpoint-500", 500), ("runs/a/step-0300", 300), ("out/global_step200", 200),
    ("model_12", 12), ("epoch3", 3), ("final/", None), ("gpt2", None), ("llama-7b", None), ("split3", None),
])
def test_step_of_names(name: str, step: int | None) -> None:
    assert step_of(name) == step


def test_checkpoints_are_ordered_by_step_with_final_last() -> None:
    order = order_models(["final/", "ckpt_step_5000/", "ckpt_step_1000/"])
    assert order.names == ["ckpt_step_1000/", "ckpt_step_5000/", "final/"]
    assert order.steps == [1000, 5000, None] and order.ordered_by == "step" and order.is_series


def test_explicit_order_and_unordered_model_sets() -> None:
    explicit = order_models(["b", "a", "c"], ["c", "a", "b"])
    assert explicit.names == ["c", "a", "b"] and explicit.ordered_by == "explicit" and explicit.is_series
    given = order_models(["gpt2-small", "llama", "step-5"])
    assert given.names == ["gpt2-small", "llama", "step-5"] and given.ordered_by == "given" and not given.is_series
    with pytest.raises(UsageError, match="not in these results"):
        order_models(["a", "b"], ["a", "x"])
    with pytest.raises(UsageError, match="every model once"):
        order_models(["a", "b"], ["a"])


# -- compare -----------------------------------------------------------------------------------
STEPS = (0, 100, 200, 300, 400, 500)


def _series_record(rng: np.random.Generator) -> Any:
    """Six checkpoints (given shuffled): loss falls by 0.3 per checkpoint with 40 paired
    per-example values; 'w.norm' has no per-example values; per-layer 'a.act' over 40 layers
    keeps its layer ranking from the first checkpoint to the last."""
    base = rng.normal(size=40)
    layer_profile = rng.normal(size=40)
    models = {}
    for k, step in enumerate(STEPS):
        samples = (3.0 - 0.3 * k + base + 0.05 * rng.normal(size=40)).tolist()
        models[f"run/step-{step}"] = {
            "m.loss": {"loss": ScalarValue(value=float(np.mean(samples)), ci_low=0.0, ci_high=9.0, samples=samples)},
            "w.norm": {"total": ScalarValue(value=10.0 + k)},
            "a.act": {"norm": LayerValue(values=(layer_profile + 0.2 * rng.normal(size=40) + k).tolist())},
        }
    shuffled = dict(sorted(models.items(), key=lambda kv: hash(kv[0]) % 7))
    return synthetic_record(shuffled)


def test_compare_checkpoints_differences_trends_and_early_indicators() -> None:
    record = _series_record(np.random.default_rng(0))
    with pytest.warns(InsufficientSampleWarning):  # outcome over 6 models is below min_n=30
        c = compare(record, outcome={f"run/step-{s}": -float(i) for i, s in enumerate(STEPS)})
    assert c.order.names == [f"run/step-{s}" for s in STEPS] and c.order.ordered_by == "step"
    loss = next(s for s in c.scalars if s.metric == "m.loss")
    assert loss.highest == "run/step-0" and loss.lowest == "run/step-500"
    assert [(d.a, d.b) for d in loss.differences][-1] == ("run/step-0", "run/step-500")
    assert len(loss.differences) == len(STEPS)  # neighbours + first vs last
    for d in loss.differences:
        assert d.test is not None and d.test.paired and d.test.test == "wilcoxon"
        assert d.test.significant and d.test.mean_difference is not None and d.test.mean_difference < 0
        assert d.test.cohen_d is not None and d.test.cohen_d < 0 and d.test.cliffs_delta is not None
    assert loss.trend is not None and loss.trend.claimed and loss.trend.significant
    assert loss.trend.direction == "decreasing" and loss.trend.tau == pytest.approx(-1.0)
    norm = next(s for s in c.scalars if s.metric == "w.norm")
    assert all(d.test is None and "per-example" in (d.note or "") for d in norm.differences)
    assert any("not tested" in w for w in c.warnings)
    (layers,) = c.layers
    assert layers.metric == "a.act" and len(layers.values) == 6 and len(layers.values[0]) == 40
    assert all(t.direction == "increasing" for t in layers.trends)
    early = [e for e in c.early_indicators if e.target == "final"]
    assert [(e.metric, e.early) for e in early] == [("a.act", "run/step-0")]
    assert early[0].stat.significant and early[0].stat.r is not None and early[0].stat.r > 0.8
    outcome = [e for e in c.early_indicators if e.target == "outcome"]
    assert outcome and all(not e.stat.claimed and "min_n=30" in (e.stat.reason or "") for e in outcome)
    assert c.summary()[0]["highest"] is not None


def test_outcome_correlation_is_claimed_above_the_floor() -> None:
    record = _series_record(np.random.default_rng(1))
    c = compare(record, outcome={f"run/step-{s}": -float(i) for i, s in enumerate(STEPS)}, min_n=5)
    loss = next(e for e in c.early_indicators if e.target == "outcome" and e.metric == "m.loss")
    assert loss.stat.claimed and loss.stat.r == pytest.approx(1.0)
    with pytest.raises(UsageError, match="outcome names models"):
        compare(record, outcome={"nope": 1.0})


def test_model_set_pairs_unpaired_when_data_differs() -> None:
    rng = np.random.default_rng(2)
    models = {name: {"m.loss": {"loss": ScalarValue(value=shift, samples=(shift + rng.normal(size=35)).tolist())}}
              for name, shift in (("alpha", 0.0), ("beta", 0.0), ("gamma", 2.0))}
    record = synthetic_record(models, data={"alpha": "d1", "beta": "d2", "gamma": "d2"})
    c = compare(record)
    assert not c.order.is_series and c.layers == [] and c.early_indicators == []
    (loss,) = c.scalars
    assert loss.trend is None and loss.highest == "gamma"
    tests = {(d.a, d.b): d.test for d in loss.differences}
    assert set(tests) == {("alpha", "beta"), ("alpha", "gamma"), ("beta", "gamma")}
    assert tests[("alpha", "beta")] is not None and not tests[("alpha", "beta")].paired
    assert tests[("beta", "gamma")] is not None and tests[("beta", "gamma")].paired
    assert tests[("beta", "gamma")].significant and not tests[("alpha", "beta")].significant


def test_results_compare_uses_an_explicit_order() -> None:
    record = _series_record(np.random.default_rng(3))
    res = Results(record)
    order = [f"run/step-{s}" for s in reversed(STEPS)]
    c = report.compare(res, order=order, outcome=None)
    assert c.order.names == order and res.comparisons is c
    loss = next(s for s in c.scalars if s.metric == "m.loss")
    assert loss.trend is not None and loss.trend.direction == "increasing"


# -- discover_correlations ---------------------------------------------------------------------
def _planted(rng: np.random.Generator, n_models: int = 3, n_layers: int = 20) -> tuple[Any, set[frozenset[str]]]:
    """Correlated group {p.a, p.a3, q.b, r.c, u.der} (u derives from p), independent s.d and t.e."""
    models = {}
    for m in range(n_models):
        a = rng.normal(size=n_layers)
        values = {"p.a": a, "p.a3": 3 * a + 1, "q.b": a + 0.3 * rng.normal(size=n_layers),
                  "r.c": -a + 0.5 * rng.normal(size=n_layers), "u.der": 2 * a + 0.01 * rng.normal(size=n_layers),
                  "s.d": rng.normal(size=n_layers), "t.e": rng.normal(size=n_layers)}
        metrics: dict[str, dict[str, Any]] = {}
        for label, v in values.items():
            metric, field = label.rsplit(".", 1)
            metric = {"p": "p.m", "q": "q.m", "r": "r.m", "u": "u.m", "s": "s.m", "t": "t.m"}[metric]
            metrics.setdefault(metric, {})[field] = LayerValue(values=v.tolist())
        models[f"model-{m}"] = metrics
    group = ["p.m.a", "p.m.a3", "q.m.b", "r.m.c", "u.m.der"]
    never = {frozenset(p) for p in (("p.m.a", "p.m.a3"), ("p.m.a", "u.m.der"), ("p.m.a3", "u.m.der"))}
    planted = {frozenset(p) for p in itertools.combinations(group, 2)} - never
    return synthetic_record(models), planted


def test_discovery_finds_the_planted_correlations_only() -> None:
    record, planted = _planted(np.random.default_rng(0))
    found = discover_correlations(record, unit="layer", derived={"u.m": ["p.m"]})
    assert found.unit == "layer" and len(found.variables) == 7
    assert {frozenset((f.x, f.y)) for f in found.significant} == planted
    for f in found.significant:
        assert f.n == 60 and f.p_adjusted is not None and f.p_adjusted < 0.05
        assert f.ci_low is not None and f.ci_high is not None and f.ci_low <= f.r <= f.ci_high
    strengths = [abs(f.r or 0) for f in found.findings]
    assert strengths == sorted(strengths, reverse=True)
    excluded = {frozenset((e.x, e.y)): e.reason for e in found.excluded}
    assert excluded[frozenset(("p.m.a", "p.m.a3"))] == "same metric"
    assert "derive" in excluded[frozenset(("p.m.a", "u.m.der"))]
    assert not any({f.x, f.y} & {"p.m.a"} and {f.x, f.y} & {"p.m.a3"} for f in found.findings)


def test_discovery_below_the_floor_claims_nothing_and_says_why() -> None:
    record, _ = _planted(np.random.default_rng(1), n_models=1, n_layers=12)
    with pytest.warns(InsufficientSampleWarning, match="min_n=30"):
        found = discover_correlations(record, unit="layer", min_n=30)
    assert found.findings == [] and found.significant == []
    assert found.not_claimed and all(f.reason and "n=12" in f.reason and "min_n=30" in f.reason
                                     for f in found.not_claimed)
    assert any("min_n=30" in w for w in found.warnings)


def test_null_runs_keep_the_share_with_any_false_discovery_at_the_fdr_level() -> None:
    """Under the global null every discovery is false, so the FDR level bounds the share of
    runs with any discovery; 400 seeded runs of 5 independent metrics (10 pairs, n=40)."""
    rng = np.random.default_rng(0)
    runs, alpha = 400, 0.05
    with_discovery = 0
    for _ in range(runs):
        record = synthetic_record({"m": {f"v{j}.x": {"x": LayerValue(values=rng.normal(size=40).tolist())}
                                         for j in range(5)}})
        found = discover_correlations(record, unit="layer", fdr=alpha, n_resamples=0)
        assert len(found.findings) == 10
        with_discovery += bool(found.significant)
    share = with_discovery / runs
    assert abs(share - alpha) <= 3 * math.sqrt(alpha * (1 - alpha) / runs), share


def test_declared_derivations_are_never_paired() -> None:
    """Derivations come from the results (recorded by the core from ``derived_from``), not from
    the installed plugins: none of these metrics is installed here."""
    rng = np.random.default_rng(4)
    a = rng.normal(size=40)
    record = synthetic_record({"m": {
        "t.source": {"value": LayerValue(values=a.tolist())},
        "t.derived": {"value": LayerValue(values=(2 * a).tolist())},
        "t.derived2": {"value": LayerValue(values=(a + 1).tolist())},
        "t.other": {"value": LayerValue(values=(a + 0.2 * rng.normal(size=40)).tolist())}}},
        derived_from={"t.derived": ["t.source"], "t.derived2": ["t.derived.value"]})
    found = discover_correlations(record, unit="layer")
    excluded = {frozenset((e.x, e.y)) for e in found.excluded}
    assert excluded == {frozenset(p) for p in (("t.source.value", "t.derived.value"),
                                               ("t.derived.value", "t.derived2.value"),
                                               ("t.source.value", "t.derived2.value"))}
    assert {frozenset((f.x, f.y)) for f in found.significant} == {
        frozenset(("t.other.value", v)) for v in ("t.source.value", "t.derived.value", "t.derived2.value")}


def test_units_head_model_and_checkpoint() -> None:
    rng = np.random.default_rng(5)
    models = {}
    for step in range(0, 3500, 100):  # 35 checkpoints
        g = rng.normal(size=(4, 3))
        x = float(rng.normal())
        models[f"ckpt-{step}"] = {"h.one": {"score": HeadValue(values=g.tolist()), "s": ScalarValue(value=x)},
                                  "h.two": {"score": HeadValue(values=(-g).tolist()),
                                            "s": ScalarValue(value=x + 0.1 * float(rng.normal()))}}
    record = synthetic_record(models)
    heads = discover_correlations(record, unit="head", n_resamples=0)
    assert heads.variables == ["h.one.score", "h.two.score"]
    (finding,) = heads.findings
    assert finding.n == 35 * 12 and finding.r == pytest.approx(-1.0) and finding.significant
    per_model = discover_correlations(record, unit="model", n_resamples=0)
    assert {frozenset((f.x, f.y)) for f in per_model.significant} == {frozenset(("h.one.s", "h.two.s"))}
    changes = discover_correlations(record, unit="checkpoint", n_resamples=0)
    assert changes.findings[0].n == 34  # changes between 35 consecutive checkpoints
    with pytest.raises(UsageError, match="ordered as checkpoints"):
        discover_correlations(synthetic_record({"x": {}, "y": {}}), unit="checkpoint")
    with pytest.raises(UsageError, match="unknown unit"):
        discover_correlations(record, unit="token")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="no values of 'h.thre'"):
        discover_correlations(record, metrics=["h.thre"], unit="head")
    assert discover_correlations(record, metrics=["h.one"], unit="head").variables == ["h.one.score"]


def test_change_points_of_a_model_set_metric_reach_the_comparison_and_the_report() -> None:
    """A model-set table with the change-point columns (dynamics.phase_transitions writes one) marks
    the matching scalar and per-layer series; the report lists every change, grouped by interval."""
    from tensorscope_core.report.comparison_section import comparison_section
    from tensorscope_core.results.schema import LayerValue, MetricResult, TableValue

    steps = [0, 25, 50, 75, 100]
    losses = [4.18, 4.10, 3.99, 2.83, 2.36]
    record = synthetic_record({f"step-{s}": {"basic.loss": {"loss": ScalarValue(value=v)},
                                             "basic.grad_norms": {"layer_norm": LayerValue(values=[1.0, v])}}
                               for s, v in zip(steps, losses, strict=True)})
    table = TableValue(columns=["series", "model_before", "model_after", "size_sd"],
                       rows=[["basic.loss.loss", "step-50", "step-75", -5.7],
                             ["basic.grad_norms.layer_norm[L1]", "step-50", "step-75", -5.7]])
    record.model_set["detector.changes"] = MetricResult(metric="detector.changes", version="1", plugin="p",
                                                        status="ok", values={"changes": table})
    result = compare(record)
    loss = next(s for s in result.scalars if (s.metric, s.field) == ("basic.loss", "loss"))
    assert [(c.model_before, c.model_after, c.found_by, c.label) for c in loss.changes] == \
        [("step-50", "step-75", "detector.changes", None)]
    layers = next(lt for lt in result.layers if lt.metric == "basic.grad_norms")
    assert [(c.model_before, c.label) for c in layers.changes] == [("step-50", "L1")]
    assert all(not s.changes for s in result.scalars if s.metric != "basic.loss")
    section = comparison_section(result, {n: n for n in result.order.names})
    tables = [b for b in section.blocks if type(b).__name__ == "Table" and "found by" in b.columns]
    assert tables[0].rows == [["step-50 → step-75", "detector.changes", 2,
                               "basic.loss.loss, basic.grad_norms.layer_norm[L1]"]]  # one row per interval


def test_discovery_over_checkpoints_tests_within_checkpoints_not_pooled() -> None:
    """Two per-layer metrics that both rise from checkpoint to checkpoint and are unrelated within
    one: pooled, 6 x 8 (checkpoint, layer) pairs look strongly correlated (pseudo-replication); the
    default test, within checkpoints, finds nothing and says which test it ran."""
    rng = np.random.default_rng(5)
    models = {f"step-{100 * m}": {"a.m": {"x": LayerValue(values=(3.0 * m + rng.normal(size=8)).tolist())},
                                  "b.m": {"y": LayerValue(values=(3.0 * m + rng.normal(size=8)).tolist())}}
              for m in range(6)}
    record = synthetic_record(models)
    pooled = discover_correlations(record, unit="layer", pooled=True)
    within = discover_correlations(record, unit="layer")
    assert pooled.significant and pooled.findings[0].r > 0.9 and pooled.findings[0].groups is None
    (finding,) = within.findings
    assert not within.significant and abs(finding.r) < 0.3 and finding.n == 48 and finding.groups == 6
    assert finding.test.startswith("within 6 groups")
