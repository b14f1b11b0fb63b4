"""The per-example gradients the plugin's metrics read, from the core's ``per_example_grads``
artifact: each example's mean-loss gradient against single-example backward passes, the
parameter subsets of several consumers merged into one computation per batch, micro-batching
and the masked-LM loop fallback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
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
from tensorscope_gradients.per_sample import mean_loss_rows, per_example_request
from tensorscope_gradients.selection import Subset, SubsetParams, layout_of, select_parameters

from tensorscope_core import RunConfig, analyze
from tensorscope_core.plugin_api import Metric, TextValue
from tensorscope_core.testing import smallest_micro_batch, temporary_plugin, tiny_model

CONFIG = RunConfig(batch_size=4, max_length=32, dtype="float64")


class Capture(Metric):
    """Test-only consumer of per_example_grads (asked as the plugin's metrics ask it): hands back
    each example's mean-loss gradient on its parameters (the core's ``mean_observed``, and the
    rows the plugin's metrics take, ``mean_loss_rows``), the loss, the target counts and the
    width of the vectors the artifact computed (the merged request's parameters)."""

    name = "gtest.per_sample"
    Params = SubsetParams
    artifacts = ("per_example_grads",)

    @classmethod
    def artifact_requests(cls, params, view):
        return per_example_request(params, view)

    def setup(self) -> None:
        self.names = select_parameters(self.view, self.params.parameters, self.params.layers)
        self.layouts: dict = {}
        self.grads: list[torch.Tensor] = []
        self.rows: list[torch.Tensor] = []
        self.loss: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.widths: list[int] = []

    def update(self, step) -> None:
        g = step["per_example_grads"]
        self.grads.append(g.mean_observed(self.names).clone())
        self.rows.append(mean_loss_rows(self.view, Subset(self.names), g, self.layouts).clone())
        self.loss.append(g.loss)
        self.targets.append(g.n_targets)
        self.widths.append(g.size)

    def finalize(self) -> dict[str, object]:
        return {"grads": torch.cat(self.grads), "rows": torch.cat(self.rows), "loss": torch.cat(self.loss),
                "n_targets": torch.cat(self.targets),
                "names": TextValue(text=",".join(self.names)),
                "widths": TextValue(text=",".join(map(str, self.widths)))}


class CaptureBatch(Metric):
    """Test-only consumer of the core's param_grad, flattened in named_parameters order."""

    name = "gtest.batch_grad"
    artifacts = ("param_grad",)

    def setup(self) -> None:
        self.layout = layout_of(self.view)
        self.rows: list[torch.Tensor] = []

    def update(self, step) -> None:
        self.rows.append(self.layout.flatten(step["param_grad"], torch.float64))

    def finalize(self) -> dict[str, object]:
        return {"grads": torch.stack(self.rows)}


def example_losses(model: torch.nn.Module, rows: list[torch.Tensor]) -> torch.Tensor:
    """Each text's mean next-token loss, run alone (float64)."""
    with torch.no_grad():
        return torch.stack([-model(input_ids=r[None]).logits[0, :-1].log_softmax(-1).gather(1, r[1:, None]).mean()
                            for r in rows]).double()


@pytest.fixture
def capture_registry() -> Iterator[None]:
    with temporary_plugin("gtest", metrics=[Capture, CaptureBatch]):
        yield


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_equals_single_example_backward_passes(family, models, texts, tokenizer, capture_registry):
    """float64, 12 padded texts in batches of 4: each row equals a backward pass of that text
    alone on its mean next-token loss (GPT-2: without any padding; LLaMA: padded alone to its
    batch's width, see example_grads), as the core gives it and as the plugin's metrics take it;
    the target counts and the mean losses too.

    The core differentiates the summed token loss and divides by the number of targets after.
    GPT-2 computes in float64 throughout, so that is the mean loss's gradient to 1e-9; LLaMA's
    RMSNorm computes in float32, so there it equals the backward pass of the summed loss divided
    after to 1e-9, and the mean loss's to float32 rounding (1e-6 of the gradient's size)."""
    res = analyze(models[family], data=texts, metrics=["gtest.per_sample"], config=CONFIG)
    got = res.tensor("gtest.per_sample", "grads")
    rows = tokenize(tokenizer, texts)
    model = load_hf(models[family])
    pad_to = batch_widths(rows) if family == "llama" else None
    want = example_grads(model, rows, pad_to=pad_to)
    assert got.shape == want.shape
    if family == "llama":
        torch.testing.assert_close(got, example_grads(model, rows, pad_to=pad_to, summed=True), rtol=1e-9,
                                   atol=1e-12)
        assert float(((got - want).norm(dim=1) / want.norm(dim=1)).max()) < 1e-6
    else:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res.tensor("gtest.per_sample", "rows"), got, rtol=0, atol=0)
    n = torch.tensor([len(r) - 1 for r in rows], dtype=torch.float64)
    torch.testing.assert_close(res.tensor("gtest.per_sample", "n_targets"), n)
    torch.testing.assert_close(res.tensor("gtest.per_sample", "loss"), example_losses(model, rows), rtol=1e-9,
                               atol=1e-12)
    # the core's param_grad is the target-weighted mean of the per-example gradients (LLaMA's
    # float32 rotary angles make a batch of 4 differ from its rows run alone by ~1e-8)
    batch = batch_grads(model, padded_batches(rows))
    atol = 1e-12 if family == "gpt2" else 1e-7
    for b in range(3):
        sl = slice(4 * b, 4 * b + 4)
        torch.testing.assert_close((n[sl, None] * got[sl]).sum(0) / n[sl].sum(), batch[b], rtol=1e-9, atol=atol)


def test_parameter_subset_and_one_computation_per_batch(models, texts, tokenizer, capture_registry):
    """Two consumers of different subsets in one run: the artifact is computed once per batch, on
    the union of their subsets only, and each gets exactly its own parameters' gradients."""
    params = {"gtest.per_sample": {"layers": [1]}, "gradients.sample_conflicts": {"parameters": ["lm_head.*"]}}
    model = load_hf(models["llama"])
    names = [n for n in param_names(model) if n.startswith("model.layers.1.")]
    block = sum(p.numel() for n, p in model.named_parameters() if n in names)
    lm_head = model.lm_head.weight.numel()
    res = analyze(models["llama"], data=texts, metrics=["gtest.per_sample", "gradients.sample_conflicts"],
                  params=params, config=CONFIG)
    assert res.get("gradients.sample_conflicts").status == "skipped"  # untasked data: skipped, needs nothing
    assert res.get("gtest.per_sample").value("widths").text == ",".join([str(block)] * 3)
    assert res.record.models[0].model_calls["artifact:per_example_grads"] == 3  # one per batch
    res = analyze(models["llama"], data={"a": texts[:8], "b": texts[8:]},
                  metrics=["gtest.per_sample", "gradients.sample_conflicts"], params=params, config=CONFIG)
    assert res.get("gradients.sample_conflicts").ok
    assert res.get("gtest.per_sample").value("names").text.split(",") == names
    # the union of the two subsets, nothing else, once per batch (2 + 1), shared by both metrics
    assert res.get("gtest.per_sample").value("widths").text == ",".join([str(block + lm_head)] * 3)
    rows = tokenize(tokenizer, texts)
    want = example_grads(model, rows, names, pad_to=batch_widths(rows), summed=True)  # see the test above
    torch.testing.assert_close(res.tensor("gtest.per_sample", "grads"), want, rtol=1e-9, atol=1e-11)
    # no shared backward was needed; one vmapped per-example call per batch
    assert res.record.models[0].passes == {"forward": 3, "per_example_backward": 3}
    assert res.record.models[0].model_calls["artifact:per_example_grads"] == 3


def test_capture_hooks_do_not_see_the_extra_forwards(models, texts, capture_registry):
    """Asking for resid (forward hooks) and param_grad beside per_example_grads leaves the other
    metrics' numbers unchanged."""
    alone = analyze(models["gpt2"], data=texts, metrics=["basic.activation_stats", "basic.grad_norms"],
                    config=CONFIG)
    shared = analyze(models["gpt2"], data=texts,
                     metrics=["basic.activation_stats", "basic.grad_norms", "gtest.per_sample"], config=CONFIG)
    for metric, field in (("basic.activation_stats", "resid_norm"), ("basic.grad_norms", "layer_norm")):
        assert shared.get(metric).value(field) == pytest.approx(alone.get(metric).value(field), rel=1e-12)
    assert shared.record.models[0].passes == {"forward": 3, "backward": 3, "per_example_backward": 3}


def test_micro_batching_gives_the_same_gradients(models, texts, capture_registry):
    """A memory budget that only fits micro-batch 1: the artifact's micro-batches join along
    the batch dimension into the same rows."""
    whole = analyze(models["gpt2"], data=texts, metrics=["gtest.per_sample"], config=CONFIG)
    micro = analyze(models["gpt2"], data=texts, metrics=["gtest.per_sample"],
                    config=smallest_micro_batch(models["gpt2"], texts, ["gtest.per_sample"], CONFIG))
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
