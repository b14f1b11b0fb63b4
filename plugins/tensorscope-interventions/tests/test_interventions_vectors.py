"""interventions.vectors: block-transplant recovery on models that differ in one block, the path's ends,
an undefined recovery, pairing, skips, bad parameters, declared passes and memory."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from tensorscope_core import RunConfig, analyze
from tensorscope_core.plugin_api import BadParameterError
from tensorscope_core.testing import check_declared_passes, random_token_data, tiny_model

METRIC = "interventions.vectors"
CONFIG = RunConfig(batch_size=3, dtype="float64")


def _differ_in_block(folder, other, block: int):
    """(broken, healthy): ``folder``'s model and a copy whose block ``block`` comes from ``other``."""
    healthy = AutoModelForCausalLM.from_pretrained(folder).double()
    donor = AutoModelForCausalLM.from_pretrained(other).double()
    broken = copy.deepcopy(healthy)
    prefix = f"{_blocks_name(healthy)}.{block}."
    with torch.no_grad():
        donors = dict(donor.named_parameters())
        for name, p in broken.named_parameters():
            if name.startswith(prefix):
                p.copy_(donors[name])
    return broken, healthy


def _blocks_name(model) -> str:
    return "transformer.h" if hasattr(model, "transformer") else "model.layers"


@pytest.fixture(scope="module")
def donors(tmp_path_factory):
    root = tmp_path_factory.mktemp("donors")
    return {f: tiny_model(f, root / f, seed=3) for f in ("gpt2", "llama", "bert")}


@pytest.mark.parametrize(("family", "block"), [("gpt2", 1), ("llama", 0)])
def test_models_differing_in_one_block_recover_exactly_there(models, donors, family, block) -> None:
    """Known answer: only block k differs, so transplanting block k gives the healthy model (recovery 1)
    and any other block the broken one (recovery 0); the path's ends are each model's basic.loss."""
    broken, healthy = _differ_in_block(models[family], donors[family], block)
    ids = random_token_data(healthy.config.vocab_size, n=7, length=9, seed=1)
    res = analyze({"broken": broken, "healthy": healthy}, data=ids, metrics=[METRIC, "basic.loss"], config=CONFIG)
    out = res.get(METRIC)
    assert out.ok, out.reason
    expected = [1.0 if layer == block else 0.0 for layer in range(2)]
    assert out.value("recovery") == pytest.approx(expected, abs=1e-6)
    assert out.value("best_block") == block
    path, alphas = out.value("loss_path"), out.value("alphas")
    assert path[alphas.index(0.0)] == pytest.approx(res.get("basic.loss", model="broken").value("loss"), abs=1e-9)
    assert path[alphas.index(1.0)] == pytest.approx(res.get("basic.loss", model="healthy").value("loss"), abs=1e-9)
    norms = out.value("vector_norm_by_layer")
    assert [n > 0 for n in norms] == [layer == block for layer in range(3)]  # blocks 0, 1, then outside
    assert out.value("vector_norm") == pytest.approx(norms[block], rel=1e-12)
    check_declared_passes(out)
    assert out.model_calls == (2 + 11 + 2 - 2 + 2) * 3  # broken, healthy, 11 other alphas, 2 blocks; 3 batches
    assert out.measured_bytes == out.declared_bytes


def test_vector_norms_and_kept_vector_match_a_direct_difference(models, donors) -> None:
    """Independent reference: |theta_h - theta_b| per block from the state dicts (two different random
    models; alignment off, so v is the plain difference), and the kept vector itself."""
    a = AutoModelForCausalLM.from_pretrained(models["gpt2"]).double()
    b = AutoModelForCausalLM.from_pretrained(donors["gpt2"]).double()
    ids = random_token_data(a.config.vocab_size, n=4, length=6, seed=2)
    res = analyze(
        {"a": a, "b": b},
        data=ids,
        metrics=[METRIC],
        config=CONFIG,
        params={METRIC: {"align": False, "keep_vector": True, "alphas": [0.0, 0.5, 1.0]}},
    )
    out = res.get(METRIC)
    assert out.ok, out.reason
    diffs = {n: (dict(b.named_parameters())[n] - p).detach() for n, p in a.named_parameters()}
    block0 = sum(float(d.square().sum()) for n, d in diffs.items() if n.startswith("transformer.h.0."))
    assert out.value("vector_norm_by_layer")[0] == pytest.approx(block0**0.5, rel=1e-12)
    flat = torch.cat([d.reshape(-1) for d in diffs.values()]).float()
    assert torch.equal(res.tensor(METRIC, "vector"), flat)
    assert out.measured_bytes == out.declared_bytes


def test_equal_losses_leave_recovery_undefined(models) -> None:
    model = AutoModelForCausalLM.from_pretrained(models["gpt2"]).double()
    ids = random_token_data(model.config.vocab_size, n=4, length=6, seed=2)
    res = analyze(
        {"b": model, "h": copy.deepcopy(model)},
        data=ids,
        metrics=[METRIC],
        config=CONFIG,
        params={METRIC: {"alphas": [0.0, 1.0]}},
    )
    out = res.get(METRIC)
    assert out.ok, out.reason
    assert "recovery" not in out.values and "undefined" in out.values["recovery_note"].text
    assert out.value("vector_norm") == 0.0 and out.value("units_moved") == 0.0


def test_bert_needs_align_off_and_then_runs(models, donors) -> None:
    ids = random_token_data(64, n=4, length=8, seed=2)
    pair = {"b": models["bert"], "h": donors["bert"]}
    skipped = analyze(pair, data=ids, metrics=[METRIC], config=RunConfig(batch_size=3)).get(METRIC)
    assert skipped.status == "skipped" and "align=False" in skipped.reason
    res = analyze(
        pair,
        data=ids,
        metrics=[METRIC, "basic.loss"],
        config=RunConfig(batch_size=3),
        params={METRIC: {"align": False, "alphas": [0.0, 0.5, 1.0]}},
    )
    out = res.get(METRIC)
    assert out.ok, out.reason
    assert out.value("loss_broken") == pytest.approx(res.get("basic.loss", model="b").value("loss"), abs=1e-5)
    assert len(out.value("recovery")) == AutoModelForMaskedLM.from_pretrained(models["bert"]).config.num_hidden_layers
    check_declared_passes(out)


def test_pairing_base_and_skips(models, donors) -> None:
    ids = random_token_data(64, n=3, length=6, seed=2)
    params = {METRIC: {"alphas": [0.0, 1.0]}}
    one = analyze(models["gpt2"], data=ids, metrics=[METRIC], params=params).get(METRIC)
    assert one.status == "skipped" and "this run has 1" in one.reason
    three = analyze(
        {"x": models["gpt2"], "y": donors["gpt2"], "z": models["gpt2"]}, data=ids, metrics=[METRIC], params=params
    ).get(METRIC)
    assert three.status == "skipped" and "'broken': ..., 'healthy': ..." in three.reason
    named = analyze(
        {"x": models["gpt2"], "y": donors["gpt2"], "z": models["gpt2"]},
        data=ids,
        metrics=[METRIC],
        params={METRIC: {"alphas": [0.0, 1.0], "broken": "y", "healthy": "z"}},
    ).get(METRIC)
    assert named.ok and named.values["pair"].text == "y -> z"
    based = analyze({"ft": donors["gpt2"]}, data=ids, metrics=[METRIC], params=params, base=models["gpt2"])
    assert based.get(METRIC).values["pair"].text.endswith("-> ft")


def test_bad_parameters_are_typed_errors(models, donors) -> None:
    for bad in ({"alphas": []}, {"recovery_tol": 0.0}, {"unknown": 1}):
        with pytest.raises((BadParameterError, ValidationError)):
            analyze({"x": models["gpt2"], "y": donors["gpt2"]}, metrics=[METRIC], params={METRIC: bad})
