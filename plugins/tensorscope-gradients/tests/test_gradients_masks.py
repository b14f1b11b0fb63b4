"""Parameter subsets asked for by name: masks from another metric (``mask_metric``).

A throwaway mask provider registered here plays the fisher plugin's role: its result holds
boolean masks as TensorValue fields ``mask/<parameter name>``. Known answer: the conflicts,
TracIn dot products and task cosines computed on the masked entries equal float64
backward passes restricted to those entries.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from gradients_reference import batch_grads, example_grads, load_hf, padded_batches, param_names, tokenize

from tensorscope_core import RunConfig, analyze, builtin_corpus
from tensorscope_core.plugin_api import Metric, Params
from tensorscope_core.testing import temporary_plugin

MASKS = "gtest.masks"
CONFLICTS, TRACIN, TERMS, TASKS = ("gradients.sample_conflicts", "gradients.tracin", "gradients.tracin_terms",
                                   "gradients.task_conflict")
CONFIG = RunConfig(batch_size=4, max_length=32, dtype="float64")


def provider_masks(model: torch.nn.Module, mode: str = "ok") -> dict[str, torch.Tensor]:
    """Seeded masks of three GPT-2 parameters, by the names the provider's fields use: the tied
    head under its alias ``lm_head.weight`` (= transformer.wte.weight), an MLP weight, and an
    attention bias given as float 0/1 rather than booleans."""
    shapes = {n: p.shape for n, p in model.named_parameters(remove_duplicate=False)}
    gen = torch.Generator().manual_seed(7)
    masks = {"lm_head.weight": torch.rand(shapes["lm_head.weight"], generator=gen) < 0.3,
             "transformer.h.1.mlp.c_fc.weight": torch.rand(shapes["transformer.h.1.mlp.c_fc.weight"],
                                                            generator=gen) < 0.3,
             "transformer.h.0.attn.c_attn.bias": (torch.rand(shapes["transformer.h.0.attn.c_attn.bias"],
                                                             generator=gen) < 0.5).double()}
    if mode == "bad_shape":
        masks["transformer.h.1.mlp.c_fc.weight"] = masks["transformer.h.1.mlp.c_fc.weight"].T.contiguous()
    elif mode == "bad_values":
        masks["transformer.h.0.attn.c_attn.bias"] = masks["transformer.h.0.attn.c_attn.bias"] * 0.5
    elif mode == "unknown_name":
        masks["transformer.h.9.mlp.c_fc.weight"] = masks.pop("transformer.h.1.mlp.c_fc.weight")
    elif mode == "tied_twice":
        masks["transformer.wte.weight"] = masks["lm_head.weight"].clone()
    elif mode == "nothing_selected":
        masks = {n: torch.zeros_like(m, dtype=torch.bool) for n, m in masks.items()}
    elif mode == "no_fields":
        masks = {}
    return masks


class MaskParams(Params):
    mode: str = "ok"


class MaskProvider(Metric):
    """Test-only mask provider: boolean masks as TensorValue fields 'mask/<name>', plus fields
    that are not masks (which the readers ignore)."""

    name = MASKS
    Params = MaskParams
    artifacts = ("weights",)

    def finalize(self) -> dict[str, object]:
        out: dict[str, object] = {f"mask/{n}": m for n, m in provider_masks(self.view.model, self.params.mode).items()}
        out["n_masks"] = float(len(out))
        out["other/transformer.wpe.weight"] = torch.zeros(3, 3)
        return out


@pytest.fixture
def mask_registry() -> Iterator[None]:
    with temporary_plugin("gtest", metrics=[MaskProvider]):
        yield


@pytest.fixture(scope="module")
def split() -> dict[str, list[str]]:
    corpus = builtin_corpus()
    return {"train": corpus[:6], "test": corpus[6:9]}


def flat_selection(model: torch.nn.Module, masks: dict[str, torch.Tensor],
                   names: set[str] | None = None) -> torch.Tensor:
    """Boolean over the flat gradient (named_parameters order): the masked entries of the
    parameters in ``names`` (all that have a mask when None). Tied aliases are resolved by
    identity, independently of the plugin's code."""
    by_id = {id(p): masks[n] for n, p in model.named_parameters(remove_duplicate=False) if n in masks}
    parts = []
    for n, p in model.named_parameters():
        keep = by_id.get(id(p))
        use = keep is not None and (names is None or n in names)
        parts.append(keep.reshape(-1).bool() if use else torch.zeros(p.numel(), dtype=torch.bool))
    return torch.cat(parts)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def test_masked_entries_equal_a_float64_reference(models, split, tokenizer, mask_registry):
    """One run, GPT-2 in float64, train 6 / test 3 texts: sample conflicts on every masked
    entry, TracIn on the masked entries of block 1 and the embedding only (masks intersect
    the name patterns: the block-0 bias mask is dropped), task conflict on every masked entry.
    Each equals float64 backward passes restricted to those entries."""
    params = {CONFLICTS: {"mask_metric": MASKS},
              TERMS: {"mask_metric": MASKS, "parameters": ["transformer.h.1.*", "transformer.wte.*"]},
              TRACIN: {"default_learning_rate": 0.5},
              TASKS: {"mask_metric": MASKS}}
    res = analyze(models["gpt2"], data=split, metrics=[CONFLICTS, TRACIN, TASKS], params=params, config=CONFIG)
    for metric in (CONFLICTS, TRACIN, TASKS):
        assert res.get(metric).status == "ok", res.get(metric).reason
    model = load_hf(models["gpt2"])
    masks = provider_masks(model)
    rows = tokenize(tokenizer, split["train"] + split["test"])
    grads = example_grads(model, rows)
    every = flat_selection(model, masks)
    assert 0 < int(every.sum()) < every.numel() // 4

    g = grads[:, every]
    norms = g.norm(dim=1)
    want_cos = g @ g.T / (norms[:, None] * norms[None, :])
    torch.testing.assert_close(res.tensor(CONFLICTS, "cosines"), want_cos, rtol=1e-9, atol=1e-12)

    block1 = {n for n in param_names(model) if n.startswith("transformer.h.1.")} | {"transformer.wte.weight"}
    sel = flat_selection(model, masks, block1)
    assert int(sel.sum()) < int(every.sum())  # the block-0 bias mask is not used by TracIn
    want_infl = 0.5 * grads[:6, sel] @ grads[6:, sel].T
    torch.testing.assert_close(res.tensor(TRACIN, "influence"), want_infl, rtol=1e-9, atol=1e-15)
    assert res.get(TRACIN).value("self_influence") == pytest.approx((0.5 * (grads[:6, sel] ** 2).sum(1)).tolist(),
                                                                    rel=1e-9)

    g_train = batch_grads(model, padded_batches(rows[:6]))[:, every]
    g_test = batch_grads(model, padded_batches(rows[6:]))[:, every]
    assert res.get(TASKS).value("cosine") == pytest.approx(_cos(g_train.mean(0), g_test.mean(0)), rel=1e-9)

    # one per-example computation per batch (2 train + 1 test), shared by the two consumers
    assert res.record.models[0].passes == {"weights": 1, "forward": 3, "backward": 3, "per_example_backward": 3}
    for metric in (CONFLICTS, TERMS, TASKS):  # declared without the masks: an upper bound
        result = res.get(metric, model=res.models[0])
        assert result.measured_bytes <= result.declared_bytes, metric


def test_a_missing_mask_metric_names_the_plugin_to_install(models, split):
    """mask_metric='fisher.masks' without the fisher plugin (left out of the registry, as where it
    is not installed): an error (or, for the model-set metric reading the terms, a skip) whose
    reason says what to install."""
    params = {CONFLICTS: {"mask_metric": "fisher.masks"}, TERMS: {"mask_metric": "fisher.masks"}}
    with temporary_plugin(only_installed=["basic", "gradients"]):
        res = analyze(models["gpt2"], data=split, metrics=[CONFLICTS, TRACIN], params=params,
                      config=RunConfig(batch_size=4))
    conflicts = res.get(CONFLICTS, model=res.models[0])
    assert conflicts.status == "error" and conflicts.error_type == "Unavailable"
    assert "needs metric 'fisher.masks'" in conflicts.reason
    assert "pip install 'tensorscope[fisher]'" in conflicts.reason
    assert res.get(TERMS, model=res.models[0]).status == "error"
    tracin = res.get(TRACIN)
    assert tracin.status == "skipped" and "pip install 'tensorscope[fisher]'" in tracin.reason


@pytest.mark.parametrize(("mode", "message"), [
    ("bad_shape", "has shape [128, 32], parameter 'transformer.h.1.mlp.c_fc.weight' has [32, 128]"),
    ("bad_values", "holds values other than 0 and 1"),
    ("unknown_name", "field 'mask/transformer.h.9.mlp.c_fc.weight' names no trainable parameter"),
    ("tied_twice", "two mask fields for parameter 'transformer.wte.weight'"),
    ("nothing_selected", "select no entry"),
    ("no_fields", "has no mask fields: expected fields named 'mask/<parameter name>'"),
])
def test_bad_masks_are_errors_that_name_the_problem(models, split, mask_registry, mode, message):
    res = analyze(models["gpt2"], data=split, metrics=[CONFLICTS],
                  params={MASKS: {"mode": mode}, CONFLICTS: {"mask_metric": MASKS}}, config=RunConfig(batch_size=4))
    result = res.get(CONFLICTS)
    assert result.status == "error" and result.error_type == "ValueError"
    assert message in result.reason


def test_another_prefix_selects_another_set_of_masks(models, split, mask_registry):
    """mask_field_prefix picks which fields are read as masks (e.g. one task's masks of a
    per-task provider): with 'other/' the provider's 3 x 3 field 'other/transformer.wpe.weight'
    is read, and refused for its shape, while the 'mask/' fields are ignored."""
    res = analyze(models["gpt2"], data=split, metrics=[CONFLICTS],
                  params={CONFLICTS: {"mask_metric": MASKS, "mask_field_prefix": "other/"}},
                  config=RunConfig(batch_size=4))
    assert "mask 'other/transformer.wpe.weight' has shape [3, 3]" in res.get(CONFLICTS).reason
