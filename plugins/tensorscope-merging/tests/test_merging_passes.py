"""Declared whole-model passes (``own_passes``) equal the calls the run counts, on a data layout and
parameters other than the pinned run's: batches of 3 with a short last batch per task, and (for the
per-model metrics) a batch of single-token rows, which has no loss target on a causal model only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from merging_models_reference import registry

from tensorscope_core import RunConfig, analyze
from tensorscope_core.plugin_api import Metric, NoParams
from tensorscope_core.testing import check_declared_passes, random_token_data, tiny_model

CONFIG = RunConfig(batch_size=3, seed=5)


def _data() -> dict[str, object]:
    """Task ``a``: 7 rows of 9 tokens (batches of 3, 3, 1); task ``b``: three single-token rows
    (padded length 1: no causal target) then one row of 4 tokens."""
    short = [torch.tensor([7 + i]) for i in range(3)]
    return {"a": random_token_data(340, n=7, length=9, seed=2), "b": [*short, torch.tensor([10, 11, 12, 13])]}


def _run(models: object, metric: str, params: dict, *extra: type, **kw: object):
    with registry("merging", *extra):
        res = analyze(models, data=_data(), metrics=[metric], params={metric: params}, config=CONFIG, **kw)
    out = res.get(metric)
    assert out.status == "ok", out.reason
    return out


@pytest.mark.parametrize("family", ["gpt2", "bert"])
@pytest.mark.parametrize(("metric", "params", "per_batch"), [
    ("landscape.sharpness", {"ascent_steps": 2, "hutchinson_probes": 1, "max_batches": 4}, 1 + 2 + 1),
    ("landscape.sharpness", {"ascent_steps": 1, "hutchinson_probes": 0, "max_batches": None}, 1 + 1),
    ("landscape.surface_2d", {"grid": 3, "max_batches": None}, 3 * 3),
    ("lottery.magnitude_masks", {"sparsities": [0.3, 0.6, 0.9], "max_batches": 3}, 1 + 2 * 3),
])
def test_per_model_metrics_make_the_passes_they_declare(models, family, metric, params, per_batch) -> None:
    out = _run(models[family], metric, params)
    check_declared_passes(out)
    # GPT-2 skips task b's single-token batch (no next token), BERT masks a token of each row
    with_target = {"gpt2": 4, "bert": 5}[family]
    used = with_target if params["max_batches"] is None else min(with_target, params["max_batches"])
    assert out.model_calls == per_batch * used
    if "batches" in out.values:
        assert out.value("batches") == used


@pytest.fixture(scope="module")
def sets(models, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per family: base (the session's tiny model) and two fine-tunes of other seeds."""
    root = tmp_path_factory.mktemp("passes-sets")
    return {f: {"base": models[f], "x": tiny_model(f, root / f"{f}-x", seed=7),
                "y": tiny_model(f, root / f"{f}-y", seed=8)} for f in ("gpt2", "llama", "bert")}


@pytest.mark.parametrize(("family", "params", "calls"), [
    ("gpt2", {"n_points": 3, "bezier_steps": 2, "align": True}, 3 * 5 * 3 + 2),  # 3 paths on 5 batches, 2 fit steps
    ("llama", {"n_points": 2, "bezier": False, "align": True}, 2 * 5 * 2),
    ("bert", {"n_points": 4, "bezier_steps": 3}, 4 * 5 * 2 + 3),
])
def test_mode_connectivity_makes_the_passes_it_declares(sets, family, params, calls) -> None:
    s = sets[family]
    out = _run({"x": s["x"], "y": s["y"]}, "merging.mode_connectivity", params, base=s["base"])
    check_declared_passes(out)
    assert out.model_calls == calls


@pytest.mark.parametrize(("family", "params"), [("gpt2", {"density": 0.5}), ("bert", {"density": 1.0}),
                                                ("llama", {"evaluate": False})])
def test_ties_conflicts_makes_the_passes_it_declares(sets, family, params) -> None:
    s = sets[family]
    out = _run({"x": s["x"], "y": s["y"]}, "merging.ties_conflicts", params, base=s["base"])
    check_declared_passes(out)
    assert out.model_calls == (0 if params.get("evaluate") is False else (3 + 2) * 5)


class FlatFisher(Metric):
    """A stand-in for fisher.diagonal (no model calls): the pooled ``true/<param>`` all ones."""

    name = "fisher.diagonal"
    Params = NoParams
    artifacts = ("weights",)

    def finalize(self):
        return {f"true/{n}": torch.ones_like(p) for n, p in self.view.model.named_parameters()}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fisher_weighted_makes_the_passes_it_declares(sets, family) -> None:
    s = sets[family]
    out = _run({"x": s["x"], "y": s["y"]}, "merging.fisher_weighted", {"floor": 1e-3}, FlatFisher, base=s["base"])
    check_declared_passes(out)
    assert out.model_calls == (2 + 2) * 5  # the two fine-tunes and the two merges, on 5 batches


def test_fisher_weighted_without_a_base_merges_every_member(sets) -> None:
    """Without a base every member is merged; the declaration knows (it is told the base)."""
    s = sets["gpt2"]
    out = _run({"x": s["x"], "y": s["y"]}, "merging.fisher_weighted", {}, FlatFisher)
    check_declared_passes(out)
    assert out.model_calls == (2 + 2) * 5
