"""Each metric that calls the whole model itself declares those calls exactly (``own_passes``):
the run counts them, on a data layout and parameters other than the pinned run's (batch 3,
two tasks, a short last batch; other modes, steps, chunks, sequence counts and prompts)."""

from __future__ import annotations

import pytest

from tensorscope_core import RunConfig, analyze
from tensorscope_core.plugin_api import BadParameterError
from tensorscope_core.testing import check_declared_passes

TEXTS = ["the cat sat on the mat", "a dog ran", "the bird flew over the old house today", "one two three four",
         "the old boat came to the river", "a cat", "the sea"]
DATA = {"train": TEXTS[:5], "test": TEXTS[5:]}  # batch 3: train 3 + 2 rows, test 2 rows
CONFIG = RunConfig(batch_size=3, max_length=12, max_batches=2, seed=1)
CLEAN = ["the cat came on the old boat", "a boat came to the old bridge"]
CORRUPT = ["the cat came on the new boat", "a boat came to the new bridge"]

PARAMS = {
    "gpt2": {
        "circuits.ablation": {"modes": ["mean"], "mlps": False},
        "circuits.head_scores": {"sequence_length": 5, "n_sequences": 5, "batch_size": 2},
        "circuits.integrated_gradients": {"target": "logit", "steps": 7, "chunk": 3},
        "circuits.patching": {"clean": CLEAN, "corrupted": CORRUPT, "answer": ["river"], "wrong": ["tower"],
                              "position": -2},
    },
    "llama": {
        "circuits.ablation": {"modes": ["zero", "mean"], "heads": False},
        "circuits.head_scores": {"sequence_length": 4, "n_sequences": 3, "batch_size": 3},
        "circuits.integrated_gradients": {"steps": 5, "chunk": 2, "rule": "riemann_trapezoid"},
        "circuits.patching": {"clean": [[5, 6, 7, 8]], "corrupted": [[5, 9, 7, 8]], "answer": [6], "wrong": [9],
                              "heads": False},
    },
    "bert": {
        "circuits.ablation": {"modes": ["zero"]},
        "circuits.head_scores": {"sequence_length": 4, "n_sequences": 4, "batch_size": 3},
        "circuits.integrated_gradients": {"target": "logit", "token": 6, "baseline": "mask", "steps": 4, "chunk": 4},
        "circuits.patching": {"clean": CLEAN, "corrupted": CORRUPT, "answer": ["river", "sea"],
                              "wrong": ["tower", "door"], "position": -3},
    },
}


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_declared_passes_are_the_calls_made(family, models):
    params = PARAMS[family]
    res = analyze(models[family], data=DATA, metrics=list(params), params=params, config=CONFIG)
    for metric in params:
        result = res.get(metric)
        assert result.ok, f"{metric}: {result.reason}"
        assert sum(result.passes_declared.values()) > 0
        check_declared_passes(result)


def test_refused_inputs_declare_and_make_no_call(models):
    params = {"circuits.integrated_gradients": {"target": "logit", "token": "the sea"},
              "circuits.patching": {"clean": CLEAN, "corrupted": ["the cat on the boat", CORRUPT[1]],
                                    "answer": ["river"], "wrong": ["tower"]}}
    res = analyze(models["gpt2"], data=DATA, metrics=list(params), params=params, config=CONFIG)
    for metric in params:
        result = res.get(metric)
        assert result.status == "error" and result.passes_declared == {} and result.model_calls == 0, result
        check_declared_passes(result)


def test_trapezoid_needs_two_steps(models):
    with pytest.raises(BadParameterError, match="at least 2 steps"):
        analyze(models["gpt2"], data=DATA, metrics=["circuits.integrated_gradients"],
                params={"circuits.integrated_gradients": {"rule": "riemann_trapezoid", "steps": 1}}, config=CONFIG)
