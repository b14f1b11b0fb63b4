"""circuits.head_specialisation: the grouping on hand-made profiles with a known grouping, the
metric's own finalize on hand-made results, and a real run whose profile is its sources' values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tensorscope_circuits.specialisation import HeadSpecialisation, SpecialisationParams, group_profiles

from tensorscope_core import HeadValue, MetricResult, RunShape, analyze

METRIC = "circuits.head_specialisation"


def test_three_clusters_are_recovered():
    """Three tight clusters of 5-feature profiles, interleaved: labels follow first appearance."""
    rng = np.random.default_rng(0)
    centres = np.array([[1.0, 0, 0, 0.2, 0.5], [0, 0, 1, 0.8, 0.5], [0, 1, 0, 0.5, 0.9]])
    truth = np.array([0, 1, 2, 0, 1, 2, 2, 0, 1])
    profiles = centres[truth] + rng.uniform(-0.02, 0.02, (len(truth), 5))
    assert group_profiles(profiles, cut=0.25).tolist() == truth.tolist()
    assert group_profiles(profiles, cut=1e-4).tolist() == list(range(len(truth)))  # every head alone
    assert group_profiles(profiles, cut=2.0).tolist() == [0] * len(truth)


def test_cut_is_on_the_average_linkage_rms_distance():
    """1 feature, values 0, 0.2, 1: {0, 0.2} merge at 0.2; the third joins at mean(1, 0.8) = 0.9.
    With 4 features (each value repeated) the RMS distance is the same."""
    x = np.array([[0.0], [0.2], [1.0]])
    assert group_profiles(x, 0.19).tolist() == [0, 1, 2]
    assert group_profiles(x, 0.21).tolist() == [0, 0, 1]
    assert group_profiles(x, 0.89).tolist() == [0, 0, 1]
    assert group_profiles(x, 0.91).tolist() == [0, 0, 0]
    assert group_profiles(np.repeat(x, 4, axis=1), 0.21).tolist() == [0, 0, 1]
    assert group_profiles(np.array([[0.3, 0.4]]), 0.1).tolist() == [0]


def result(metric: str, **grids: list[list[float | None]]) -> MetricResult:
    return MetricResult(metric=metric, version="1", plugin="fake", status="ok",
                        values={k: HeadValue(values=v) for k, v in grids.items()})


def test_finalize_groups_hand_made_scores_and_notes_missing_features():
    """One layer, 4 heads: two previous-token heads, one duplicate head, one diffuse head (high
    entropy); induction is absent (an encoder) and left out with a note; a None counts as 0."""
    deps = {"circuits.head_scores": result("circuits.head_scores", previous_token=[[0.95, 0.9, 0.0, 0.05]],
                                           duplicate_token=[[0.0, None, 0.9, 0.0]]),
            "circuits.attention_entropy": result("circuits.attention_entropy", normalised=[[0.1, 0.15, 0.2, 0.95]]),
            "circuits.qkov": result("circuits.qkov", copying_positive=[[0.5, 0.5, 0.9, 0.5]])}
    view = type("View", (), {"n_heads": 4})()
    metric = HeadSpecialisation(SpecialisationParams(cut=0.3), RunShape(4, 8, 1, 4, (), 0), view, deps)
    out = metric.finalize()
    assert out["group"].values == [[0, 0, 1, 2]]
    assert out["features"].text == "previous_token, duplicate_token, entropy, copying"
    assert "induction left out" in out["notes"].text
    assert out["profile"][0, 1].tolist() == pytest.approx([0.9, 0.0, 0.15, 0.5])
    rows = {r[0]: r for r in out["groups"].rows}
    assert rows[0][1:3] == [2, "previous_token+copying"] and rows[0][-1] == "0.0 0.1"
    assert rows[1][2] == "duplicate_token+copying" and rows[2][2] == "entropy+copying"
    assert out["n_groups"] == 3.0


def test_real_run_reads_its_sources(models):
    ids = torch.randint(5, 300, (8, 12), generator=torch.Generator().manual_seed(0))
    params = {"circuits.head_scores": {"sequence_length": 10, "n_sequences": 4}}
    res = analyze(models["gpt2"], data=ids, metrics=[METRIC], params=params)
    out = res.get(METRIC)
    assert out.ok, out.reason
    profile = res.tensor(METRIC, "profile")
    assert profile.shape == (2, 4, 5)
    sources = [res.get("circuits.head_scores").value("previous_token"),
               res.get("circuits.head_scores").value("induction"),
               res.get("circuits.attention_entropy").value("normalised"),
               res.get("circuits.qkov").value("copying_positive")]
    for index, grid in zip((0, 2, 3, 4), sources, strict=True):
        assert np.allclose(profile[..., index].numpy(), np.array(grid, dtype=float))
    assert sum(r[1] for r in out.values["groups"].rows) == 8


def test_only_the_metrics_of_the_chosen_features_are_needed(models):
    params = {METRIC: {"features": ["previous_token", "copying"]}}
    res = analyze(models["llama"], metrics=[METRIC], params=params)
    assert res.get(METRIC).ok and res.tensor(METRIC, "profile").shape == (2, 4, 2)
    assert set(res.record.models[0].metrics) == {METRIC, "circuits.head_scores", "circuits.qkov"}
