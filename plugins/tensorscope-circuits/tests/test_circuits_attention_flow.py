"""circuits.attention_flow: a hand-made 2-layer pattern set with a product worked out by hand,
fed through the metric's own update/finalize, and the rollout of real models against a
numpy reference over HF's attentions, one unpadded sequence at a time."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tensorscope_circuits.attention_flow import AttentionFlow, AttentionFlowParams
from transformers import AutoModel, AutoTokenizer

from tensorscope_core import Batch, NoParams, RunConfig, RunShape, Step, analyze
from tensorscope_core.plugin_api import LossTargets, ModelSetMetric
from tensorscope_core.testing import check_declared_cost, check_roundtrip, padded_batches

METRIC = "circuits.attention_flow"
TEXTS = ["the cat sat on the mat", "a dog", "the bird flew over the old house today", "one two three"]

SELF = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
FIRST = [[1, 0, 0], [1, 0, 0], [1, 0, 0]]
PREVIOUS = [[1, 0, 0], [1, 0, 0], [0, 1, 0]]
# mean head A0 = [[1,0,0],[.5,.5,0],[.5,0,.5]] -> M0 = .5 A0 + .5 I = [[1,0,0],[.25,.75,0],[.25,0,.75]]
# A1 = PREVIOUS                               -> M1 = [[1,0,0],[.5,.5,0],[0,.5,.5]]
# M1 @ M0 = [[1,0,0],[.625,.375,0],[.25,.375,.375]]
ROLLOUT = [[1, 0, 0], [0.625, 0.375, 0], [0.25, 0.375, 0.375]]


def hand_step() -> Step:
    """Two sequences: three real tokens, and two real tokens with garbage on the padded row."""
    layer0 = torch.tensor([[SELF, FIRST], [SELF, FIRST]], dtype=torch.float32)
    layer1 = torch.tensor([[PREVIOUS, PREVIOUS], [PREVIOUS, PREVIOUS]], dtype=torch.float32)
    layer0[1, :, 2] = layer1[1, :, 2] = 1 / 3  # the padded query row: must not matter
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    ids = torch.zeros(2, 3, dtype=torch.long)
    targets = LossTargets(ids, ids, torch.zeros_like(mask))  # the rollout reads no targets
    return Step(Batch(ids, mask, None, 0), {"attn_pattern": [layer0, layer1]}, targets)


def test_hand_made_patterns_give_the_hand_computed_product():
    view = None  # the rollout reads only the patterns: no model is needed
    metric = AttentionFlow(AttentionFlowParams(per_sequence=True), RunShape(2, 3, 1, 2, (), 0), view)
    metric.update(hand_step())
    out = metric.finalize()
    torch.testing.assert_close(out["rollout"][0], torch.tensor(ROLLOUT, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(out["rollout"][1, :2, :2], torch.tensor(ROLLOUT, dtype=torch.float64)[:2, :2],
                               rtol=0, atol=1e-15)
    assert out["rollout"][1, 2].isnan().all() and out["rollout"][1, :, 2].isnan().all()
    torch.testing.assert_close(out["last_token"], torch.tensor([[0.25, 0.375, 0.375], [0.625, 0.375, math.nan]],
                                                               dtype=torch.float64), equal_nan=True, rtol=0, atol=1e-15)
    # rows 0-1 are the same in both sequences; row 2 and column 2 exist in the first only
    torch.testing.assert_close(out["rollout_mean"], torch.tensor(ROLLOUT, dtype=torch.float64), rtol=0, atol=1e-15)


class RunTargets(ModelSetMetric):
    """Used only for ``loss_targets``: the run's loss targets (an encoder's seeded masks), public API."""

    name = "test.run_targets"


def model_inputs(folder, texts, batch_size, causal) -> list[torch.Tensor]:
    """Each text's ids as the shared forward sees them: an encoder's carry the core's seeded masks."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = [torch.tensor(tokenizer(text)["input_ids"]) for text in texts]
    view = SimpleNamespace(causal=causal, mask_token_id=tokenizer.mask_token_id)
    run = RunTargets(NoParams(), RunShape(batch_size, 0, 0, 0, (), seed=0))
    inputs = []
    for index, (ids, mask) in enumerate(padded_batches(rows, batch_size)):
        masked = run.loss_targets(view, Batch(ids, mask, None, index, index)).model_input  # type: ignore[arg-type]
        inputs += [masked[i, :int(mask[i].sum())] for i in range(len(ids))]
    return inputs


def reference(folder, texts, batch_size, causal) -> list[np.ndarray]:
    """Rollout per unpadded sequence with numpy from output_attentions (head mean, 0.5 A + 0.5 I)."""
    model = AutoModel.from_pretrained(folder, attn_implementation="eager").double().eval()
    flows = []
    for row in model_inputs(folder, texts, batch_size, causal):
        ids = row[None]
        with torch.no_grad():
            attentions = model(ids, output_attentions=True).attentions
        flow = np.eye(ids.shape[1])
        for a in attentions:
            m = 0.5 * a[0].numpy().mean(axis=0) + 0.5 * np.eye(ids.shape[1])
            flow = (m / m.sum(axis=1, keepdims=True)) @ flow
        flows.append(flow)
    return flows


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox", "bert"])
def test_rollout_of_real_models_matches_numpy_reference(family, models, neox_model, tmp_path):
    folder = neox_model if family == "neox" else models[family]
    config = RunConfig(batch_size=2, dtype="float64")  # two padded batches
    res = analyze(folder, data=TEXTS, metrics=[METRIC], params={METRIC: {"per_sequence": True}},
                  config=config)
    result = res.get(METRIC)
    assert result.ok, result.reason
    got, last = res.tensor(METRIC, "rollout"), res.tensor(METRIC, "last_token")
    for i, flow in enumerate(reference(folder, TEXTS, 2, causal=family != "bert")):
        n = flow.shape[0]
        np.testing.assert_allclose(got[i, :n, :n].numpy(), flow, rtol=1e-7, atol=1e-9)  # rotary in float32
        np.testing.assert_array_equal(got[i, n - 1, :n].numpy(), last[i, :n].numpy())
        assert last[i, n:].isnan().all()
    check_declared_cost(result)
    check_roundtrip(res, tmp_path / "out")
