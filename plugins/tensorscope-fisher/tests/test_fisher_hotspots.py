"""fisher.hotspots and fisher.hotspots_compare: categories and scores on hand-made spectra with exactly known
outcomes (thresholds at their boundaries), the wiring to fisher.spectrum, the comparison, the report section."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from pydantic import ValidationError
from scipy import stats
from tensorscope_fisher.hotspots import FisherHotspots, global_stats
from tensorscope_fisher.hotspots_report import hotspots_section
from tensorscope_fisher.hotspots_rules import (
    HeadStats,
    HotspotParams,
    classify,
    compression_potential,
    efficiency_score,
    median_cond,
    top_heads,
)
from transformers import AutoModelForCausalLM

from tensorscope_core import RunConfig, analyze
from tensorscope_core.testing import (
    check_declared_cost,
    check_roundtrip,
    random_token_data,
    temporary_plugin,
    tiny_model,
)

#      trace      cond    e8      expected            compression_potential            efficiency
HAND = [(2.0, 1000.0, 1.0, "critical", 75.0, 0.0),  # the top head: trace fraction 1
        (1.9, 10.0, 1.0, "moderate", 50.0, 5.0),  # trace fraction exactly 0.95: not above it; cond low
        (1.9000001, 1.0, 0.5, "critical", 0.0, 100 * (1 - 1.9000001 / 2)),  # fraction just above 0.95
        (0.5, 100.0, 0.9, "high_potential", 100 * 0.9 * 2 / 3, 75.0),  # cond = the median, e8 = 0.9 exactly
        (0.5, 100.0, 0.8999, "moderate", 100 * 0.8999 * 2 / 3, 75.0),  # energy just below
        (0.5, 99.99, 1.0, "moderate", 100 * math.log10(99.99) / (1 + math.log10(99.99)), 75.0),  # cond just below
        (1.0, math.inf, 0.95, "high_potential", 95.0, 50.0),  # singular: the largest cond
        (0.0, None, None, "high_potential", 100.0, 100.0)]  # zero Fisher: no effect on the loss
# defined conds sorted 1, 10, 99.99, 100, 100, 1000, inf -> median 100; max trace 2


def hand_heads():
    return [HeadStats(0, i, t, 1.0, c, e8, e8, 1.0) for i, (t, c, e8, *_) in enumerate(HAND)]


def test_categories_and_scores_on_hand_made_spectra():
    verdicts = classify(hand_heads(), HotspotParams())
    for (*_, category, potential, efficiency), v in zip(HAND, verdicts, strict=True):
        assert v.category == category
        assert v.compression_potential == pytest.approx(potential, abs=1e-12)
        assert v.efficiency_score == pytest.approx(efficiency, abs=1e-12)
    assert verdicts[1].trace_fraction == 0.95 and verdicts[0].trace_fraction == 1.0
    moved = classify(hand_heads(), HotspotParams(critical_trace_fraction=0.94, potential_energy_r8=0.8999))
    assert moved[1].category == "critical" and moved[4].category == "high_potential"


def test_scores_rise_with_cond_and_energy_and_fall_with_trace():
    conds = [1.0, 2.0, 10.0, 1e3, 1e6, math.inf]
    for energy in (0.3, 0.9, 1.0):
        by_cond = [compression_potential(1.0, c, energy) for c in conds]
        assert by_cond[0] == 0.0 and by_cond[-1] == pytest.approx(100 * energy)
        assert all(a < b for a, b in pairwise(by_cond))
    for cond in conds[1:]:
        by_energy = [compression_potential(1.0, cond, e) for e in (0.1, 0.5, 0.9, 1.0)]
        assert all(a < b for a, b in pairwise(by_energy))
    assert [compression_potential(1.0, 10.0, 1.0), compression_potential(1.0, 1e3, 0.8)] == pytest.approx([50, 60])
    assert compression_potential(1.0, None, 0.9) == compression_potential(1.0, 10.0, math.nan) == 0.0
    by_trace = [efficiency_score(t, 4.0) for t in (0.0, 1.0, 2.0, 4.0)]
    assert by_trace == pytest.approx([100, 75, 50, 0])
    assert efficiency_score(0.0, 0.0) == 100.0


def test_global_statistics_and_hotspots_by_hand():
    heads, verdicts = hand_heads(), classify(hand_heads(), HotspotParams())
    g = global_stats(heads, verdicts, mlp_traces=[2.0, None])
    total = 2 + 1.9 + 1.9000001 + 3 * 0.5 + 1
    assert g["total_trace"] == pytest.approx(total) and g["median_trace"] == 0.75 and g["max_trace"] == 2.0
    assert g["attn_trace_share"] == pytest.approx(total / (total + 2.0))
    assert (g["n_critical"], g["n_high_potential"], g["n_moderate"]) == (2, 3, 3)
    assert g["compression_potential"] == pytest.approx(sum(h[4] for h in HAND) / 8)
    assert g["efficiency_score"] == pytest.approx(sum(h[5] for h in HAND) / 8)
    assert g["median_cond"] == median_cond(heads) == 100.0  # the high_potential bound
    assert [h.head for h in top_heads(heads, "trace", 3)] == [0, 2, 1]
    assert [h.head for h in top_heads(heads, "cond", 2)] == [0, 3]  # inf and undefined are left out; ties by head


def test_thresholds_are_checked():
    with pytest.raises(ValidationError, match="critical_trace_fraction"):
        HotspotParams(critical_trace_fraction=1.0)  # nothing could be above the top head


@pytest.fixture(scope="module")
def two_runs(models):
    ids = random_token_data(300, n=8, length=12, seed=4)
    return analyze({"gpt2": models["gpt2"], "llama": models["llama"]}, data=ids,
                   metrics=["fisher.hotspots", "fisher.hotspots_compare"], config=RunConfig(batch_size=4))


def test_table_carries_the_spectrum_and_round_trips(two_runs, tmp_path):
    for model in ("gpt2", "llama"):
        spectrum, hot = two_runs.get("fisher.spectrum", model=model), two_runs.get("fisher.hotspots", model=model)
        table = hot.values["table"]
        assert table.columns == ["run_name", "layer", "head", "metric", "value"]
        cells = {(r[1], r[2], r[3]): r[4] for r in table.rows}
        assert {r[0] for r in table.rows} == {model} and len(table.rows) == (2 * 4 + 2) * 6
        for layer in range(2):
            for head in range(4):
                for metric in ("trace", "eigmax", "cond", "energy_r8", "energy_r16", "effective_rank"):
                    assert cells[(layer, head, metric)] == spectrum.value(f"attn_{metric}")[layer][head]
            assert cells[(layer, "mlp", "trace")] == spectrum.value("mlp_trace")[layer]
        traces = spectrum.value("attn_trace")
        best = max(((lay, h) for lay in range(2) for h in range(4)), key=lambda ij: traces[ij[0]][ij[1]])
        assert hot.values["hotspots"].rows[0][:4] == ["top_trace", 1, *best]
        readings = FisherHotspots.interpret(hot)
        assert any(r.level == "hotspot" and r.where == f"layer {best[0]} head {best[1]}" and "trace" in r.text
                   for r in readings)
        assert "How to read" in hot.values["guide"].text
        assert "thresholds: critical at trace > 0.95 x the top head's" in hot.values["summary"].text
    check_roundtrip(two_runs, tmp_path / "out")


def test_planted_loud_head_is_the_critical_hotspot(models):
    """A hand-built answer: GPT-2 layer 1 head 2 with its output projection scaled 30x. The gradients of
    its Q/K/V entries grow 30x (trace ~900x), so it is the top-trace hotspot and critical."""
    model = AutoModelForCausalLM.from_pretrained(models["gpt2"], attn_implementation="eager")
    with torch.no_grad():
        model.transformer.h[1].attn.c_proj.weight[16:24] *= 30.0  # rows of head 2 (d_head 8)
    res = analyze(model, data=random_token_data(300, n=8, length=12, seed=5), metrics=["fisher.hotspots"],
                  config=RunConfig(batch_size=4))
    hot = res.get("fisher.hotspots")
    assert hot.values["hotspots"].rows[0][:4] == ["top_trace", 1, 1, 2]
    assert hot.value("category")[1][2] == 2.0  # critical
    assert hot.value("n_critical") >= 1


def test_comparison_across_models(two_runs):
    compare = two_runs.get("fisher.hotspots_compare")
    assert compare.ok
    grids = {m: two_runs.get("fisher.hotspots", model=m).value("category") for m in ("gpt2", "llama")}
    same = sum(grids["gpt2"][i][j] == grids["llama"][i][j] for i in range(2) for j in range(4))
    assert compare.value("category_agreement") == pytest.approx(same / 8)
    assert len(compare.values["table"].rows) == 2 * (2 * 4 + 2) * 6
    traces = {m: sum(two_runs.get("fisher.spectrum", model=m).value("attn_trace"), []) for m in grids}
    rho = stats.spearmanr(traces["gpt2"], traces["llama"]).statistic
    assert compare.value("trace_rank_correlation") == pytest.approx([rho], abs=1e-12)
    assert [r[0] for r in compare.values["global"].rows] == ["gpt2", "llama"]


def test_hotspots_hold_no_state(two_runs):
    check_declared_cost(two_runs.get("fisher.hotspots", model="gpt2"))
    assert two_runs.get("fisher.hotspots", model="gpt2").measured_bytes == 0


def test_comparison_of_different_grids_compares_global_statistics(models, tmp_path):
    shallow = tiny_model("gpt2", tmp_path / "shallow", seed=2, n_layers=1)
    res = analyze({"deep": models["gpt2"], "shallow": shallow}, data=random_token_data(300, n=4, length=8),
                  metrics=["fisher.hotspots_compare"])
    compare = res.get("fisher.hotspots_compare")
    assert compare.ok and "category_changes" not in compare.values and len(compare.values["global"].rows) == 2
    assert "grids differ" in compare.values["summary"].text


def test_comparison_needs_two_models(models):
    res = analyze(models["gpt2"], data=random_token_data(300, n=4, length=8), metrics=["fisher.hotspots_compare"])
    result = res.get("fisher.hotspots_compare")
    assert result.status == "skipped" and "pass at least 2 models" in result.reason


def test_report_section_renders(two_runs, models):
    html = hotspots_section(two_runs)
    assert html is not None and html.count('class="plot"') == 4  # a category map and a scatter per model
    assert "<h3>llama</h3>" in html and "How to read" in html and 'alt="llama: Fisher category of each head"' in html
    with temporary_plugin("fisher-report-check") as registry:  # the installed plugins (and an empty one)
        registered = [render for title, render in registry.report_sections if title == "Fisher hotspots"]
    assert registered == [hotspots_section]  # the report calls it through register_report_sections
    other = analyze(models["gpt2"], data=random_token_data(300, n=4, length=8), metrics=["fisher.kfac"])
    assert hotspots_section(other) is None  # no hotspots result: the section stays out
