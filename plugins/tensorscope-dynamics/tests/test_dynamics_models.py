"""Every per-model metric of the plugin on tiny GPT-2, LLaMA (grouped-query) and BERT models in
one run: they share one forward per batch, and each declares exactly the passes it makes."""

from __future__ import annotations

import pytest

from tensorscope_core import RunConfig, analyze
from tensorscope_core.testing import check_declared_cost, check_declared_passes

TEXTS = [
    "the cat sat on the mat",
    "a dog ran",
    "the bird flew over the old house today",
    "one two three four",
    "the old boat came to the river",
]
CONFIG = RunConfig(batch_size=3, max_length=12, seed=1)  # 2 batches, the last one short, padded
PARAMS = {
    "dynamics.fragility": {"sigmas": [0.1], "rhos": [0.05, 0.1], "n_directions": 1, "max_batches": 2},
    "dynamics.plasticity": {"k_steps": 2, "srank_tokens": 8},
    "dynamics.signal_propagation": {"n_probes": 2, "max_batches": 1, "sv_tokens": 1},
    "dynamics.task_accuracy": {},
}
EXPECTED = {  # own passes over the run, from the parameters (2 blocks, 2 batches)
    "dynamics.fragility": {"replay_forward": (1 + 2) * 2},
    "dynamics.plasticity": {"replay_backward": (1 + 1 + 2) * 2, "replay_forward": 1 + 1 + 2 + 1},  # + recording
    "dynamics.signal_propagation": {"replay_forward": 1 + 1},  # the probed batch, the sv token's sequence
    "dynamics.task_accuracy": {},
}


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_tiny_models_share_one_forward_and_declare_their_passes(models, family):
    res = analyze(models[family], data=TEXTS, metrics=list(PARAMS), params=PARAMS, config=CONFIG)
    record = res.record.models[0]
    assert record.passes["forward"] == 2 and "backward" not in record.passes
    assert record.passes["replay_forward"] == sum(e.get("replay_forward", 0) for e in EXPECTED.values())
    for metric, expected in EXPECTED.items():
        result = record.metrics[metric]
        assert result.ok, f"{metric}: {result.reason}"
        assert result.passes_declared == expected
        check_declared_passes(result)
        check_declared_cost(result)
    chi = record.metrics["dynamics.signal_propagation"].value("chi")
    assert len(chi) == 2 and all(c > 0 for c in chi)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_representation_drift_on_each_family(models, family):
    res = analyze(
        {"step-1": models[family], "step-2": models[family]},
        data=TEXTS,
        metrics=["dynamics.representation_drift"],
        config=CONFIG,
    )
    result = res.get("dynamics.representation_drift")
    assert result.ok, result.reason
    assert result.value("max_drift") == pytest.approx(0.0, abs=1e-12)
