"""The per_sample_grad artifact against single-example backward passes, and its sharing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import tensorscope_gradients.per_sample as per_sample
import torch
from gradients_reference import (
    batch_grads,
    batch_widths,
    example_grads,
    load_hf,
    padded_batches,
    param_names,
    tokenize,
)
from tensorscope_gradients.per_sample import request_parameters, requested_layout
from tensorscope_gradients.selection import SubsetParams, layout_of, select_parameters

import tensorscope_core.plugins as plugins_module
from tensorscope_core import Metric, RunConfig, TextValue, analyze, plan
from tensorscope_core.plugins import build_registry, plugin_module
from tensorscope_core.testing import tiny_model

CONFIG = RunConfig(batch_size=4, max_length=32, dtype="float64")


class Capture(Metric):
    """Test-only consumer of per_sample_grad: hands back what the artifact gave it."""

    name = "gtest.per_sample"
    Params = SubsetParams
    artifacts = ("per_sample_grad",)

    def setup(self) -> None:
        assert self.view is not None
        self.names = select_parameters(self.view, self.params.parameters, self.params.layers)
        request_parameters(self.view, self.name, self.names)
        self.grads: list[torch.Tensor] = []
        self.loss: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def update(self, step) -> None:
        assert self.view is not None
        grads, loss, n = step["per_sample_grad"]
        columns = requested_layout(self.view).columns(self.names)
        self.grads.append((grads if columns is None else grads[:, columns]).clone())
        self.loss.append(loss)
        self.targets.append(n)

    def finalize(self) -> dict[str, object]:
        return {"grads": torch.cat(self.grads), "loss": torch.cat(self.loss), "n_targets": torch.cat(self.targets),
                "names": TextValue(text=",".join(self.names))}


class CaptureBatch(Metric):
    """Test-only consumer of the core's param_grad, flattened in named_parameters order."""

    name = "gtest.batch_grad"
    artifacts = ("param_grad",)

    def setup(self) -> None:
        assert self.view is not None
        self.layout = layout_of(self.view)
        self.rows: list[torch.Tensor] = []

    def update(self, step) -> None:
        self.rows.append(self.layout.flatten(step["param_grad"], torch.float64))

    def finalize(self) -> dict[str, object]:
        return {"grads": torch.stack(self.rows)}


def _register(register) -> None:
    register(Capture)
    register(CaptureBatch)


@pytest.fixture
def capture_registry() -> Iterator[None]:
    saved = plugins_module._REGISTRY
    plugins_module._REGISTRY = build_registry(extra_plugins=[(
        "gtest", plugin_module("gtest", register_metrics=_register))])
    yield
    plugins_module._REGISTRY = saved


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_equals_single_example_backward_passes(family, models, texts, tokenizer, capture_registry):
    """float64, 12 padded texts in batches of 4: each row equals a backward pass of that text
    alone on its mean next-token loss (GPT-2: without any padding; LLaMA: padded alone to its
    batch's width, see example_grads); the target counts too."""
    res = analyze(models[family], data=texts, metrics=["gtest.per_sample"], config=CONFIG)
    got = res.tensor("gtest.per_sample", "grads")
    rows = tokenize(tokenizer, texts)
    model = load_hf(models[family])
    want = example_grads(model, rows, pad_to=batch_widths(rows) if family == "llama" else None)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    n = torch.tensor([len(r) - 1 for r in rows], dtype=torch.float64)
    torch.testing.assert_close(res.tensor("gtest.per_sample", "n_targets"), n)
    # the core's param_grad is the target-weighted mean of the per-example gradients (LLaMA's
    # float32 rotary angles make a batch of 4 differ from its rows run alone by ~1e-8)
    batch = batch_grads(model, padded_batches(rows))
    atol = 1e-12 if family == "gpt2" else 1e-7
    for b in range(3):
        sl = slice(4 * b, 4 * b + 4)
        torch.testing.assert_close((n[sl, None] * got[sl]).sum(0) / n[sl].sum(), batch[b], rtol=1e-9, atol=atol)


def test_parameter_subset_and_one_computation_per_batch(models, texts, tokenizer, capture_registry, monkeypatch):
    """Two consumers of different subsets in one run: the artifact is computed once per batch, on
    the union of their subsets only, and each gets exactly its own parameters' gradients."""
    calls: list[int] = []
    original = per_sample.per_example_grads

    def counting(view, layout, *args):
        calls.append(layout.size)
        return original(view, layout, *args)

    monkeypatch.setattr(per_sample, "per_example_grads", counting)
    res = analyze(models["llama"], data=texts, metrics=["gtest.per_sample", "gradients.sample_conflicts"],
                  params={"gtest.per_sample": {"layers": [1]},
                          "gradients.sample_conflicts": {"parameters": ["lm_head.*"]}},
                  config=CONFIG)
    assert res.get("gradients.sample_conflicts").status == "skipped"  # untasked data: skipped, needs nothing
    assert len(calls) == 3  # one per batch
    res = analyze(models["llama"], data={"a": texts[:8], "b": texts[8:]},
                  metrics=["gtest.per_sample", "gradients.sample_conflicts"],
                  params={"gtest.per_sample": {"layers": [1]},
                          "gradients.sample_conflicts": {"parameters": ["lm_head.*"]}}, config=CONFIG)
    assert res.get("gradients.sample_conflicts").ok
    assert len(calls) == 3 + 3  # 2 + 1 batches, shared by both metrics
    model = load_hf(models["llama"])
    names = res.get("gtest.per_sample").value("names").text.split(",")
    assert names == [n for n in param_names(model) if n.startswith("model.layers.1.")]
    lm_head = model.lm_head.weight.numel()
    block = sum(p.numel() for n, p in model.named_parameters() if n in names)
    assert calls[-1] == block + lm_head  # the union of the two subsets, nothing else
    rows = tokenize(tokenizer, texts)
    want = example_grads(model, rows, names, pad_to=batch_widths(rows))
    torch.testing.assert_close(res.tensor("gtest.per_sample", "grads"), want, rtol=1e-9, atol=1e-11)
    assert res.record.models[0].passes == {"forward": 3}  # no shared backward was needed


def test_capture_hooks_do_not_see_the_extra_forwards(models, texts, capture_registry):
    """Asking for resid (forward hooks) and param_grad beside per_sample_grad leaves the other
    metrics' numbers unchanged."""
    alone = analyze(models["gpt2"], data=texts, metrics=["basic.activation_stats", "basic.grad_norms"],
                    config=CONFIG)
    shared = analyze(models["gpt2"], data=texts,
                     metrics=["basic.activation_stats", "basic.grad_norms", "gtest.per_sample"], config=CONFIG)
    for metric, field in (("basic.activation_stats", "resid_norm"), ("basic.grad_norms", "layer_norm")):
        assert shared.get(metric).value(field) == pytest.approx(alone.get(metric).value(field), rel=1e-12)
    assert shared.record.models[0].passes == {"forward": 3, "backward": 3}


def test_micro_batching_gives_the_same_gradients(models, texts, capture_registry):
    """A memory budget that only fits micro-batch 1: the artifact's micro-batches join along
    the batch dimension into the same rows."""
    floor = plan(models["gpt2"], texts, ["gtest.per_sample"], config=CONFIG.model_copy(update={"memory_budget": 1}))
    assert floor[0].micro_batch == 1
    whole = analyze(models["gpt2"], data=texts, metrics=["gtest.per_sample"], config=CONFIG)
    micro = analyze(models["gpt2"], data=texts, metrics=["gtest.per_sample"],
                    config=CONFIG.model_copy(update={"memory_budget": floor[0].peak_bytes}))
    torch.testing.assert_close(micro.tensor("gtest.per_sample", "grads"), whole.tensor("gtest.per_sample", "grads"),
                               rtol=1e-12, atol=1e-15)


def test_masked_lm_loop_fallback_matches_the_core_loss(tmp_path, texts, capture_registry):
    """BERT: transformers' bidirectional mask cannot be vmapped, so the artifact loops over the
    examples; on the core's seeded masked positions, the target-weighted mean of the
    per-example gradients is the core's batch gradient."""
    folder = tiny_model("bert", tmp_path / "bert", seed=0)
    res = analyze(folder, data=texts, metrics=["gtest.per_sample", "gtest.batch_grad"], config=CONFIG)
    got = res.tensor("gtest.per_sample", "grads")
    n = res.tensor("gtest.per_sample", "n_targets")
    batch = res.tensor("gtest.batch_grad", "grads")
    assert (n > 0).all()
    for b in range(3):
        sl = slice(4 * b, 4 * b + 4)
        torch.testing.assert_close((n[sl, None] * got[sl]).sum(0) / n[sl].sum(), batch[b], rtol=1e-9, atol=1e-12)
