"""``ModelView.planning`` / ``memoised``: a plan reads the same sizes of the model thousands of times; inside the
block each is worked out once, outside it every time (the model may be cast, moved or dispatched between
plans), and a plan made with the memo is the plan made without it."""

from __future__ import annotations

from pathlib import Path

import torch

from tensorscope_core import RunConfig, plan
from tensorscope_core.plugin_api import model_view
from tensorscope_core.testing import tiny_model


def test_memoised_values_live_inside_planning_only(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama", tmp_path / "llama"))
    calls: list[int] = []

    def count() -> int:
        calls.append(1)
        return len(calls)

    with model_view(model) as view:
        assert view.memoised("k", count) == 1 and view.memoised("k", count) == 2  # outside: every time
        with view.planning():
            assert view.memoised("k", count) == 3
            with view.planning():  # nested: the outer block's values
                assert view.memoised("k", count) == 3
            assert view.memoised("k", count) == 3 and view.memoised("other", count) == 4
        assert view.memoised("k", count) == 5  # dropped with the outer block
        fp32 = view.every_param_bytes
        model.to(torch.float64)  # outside a plan a size follows the model
        assert view.every_param_bytes == 2 * fp32


def test_a_plan_with_the_memo_equals_one_without(tmp_path: Path, monkeypatch) -> None:
    from tensorscope_core.models.view import ModelView

    folder = tiny_model("gpt2", tmp_path / "gpt2")
    config = RunConfig(batch_size=2, max_length=16, memory_budget="1GiB")
    data = ["a few words of text", "and a few more words here"] * 2
    metrics = ["gradients.sample_conflicts", "fisher.kfac", "fisher.spectrum", "basic.grad_norms"]
    memo = plan(str(folder), data, metrics, config=config)[0]
    monkeypatch.setattr(ModelView, "memoised", lambda self, key, compute: compute())
    fresh = plan(str(folder), data, metrics, config=config)[0]
    assert memo.render() == fresh.render()
    assert memo.peak_bytes == fresh.peak_bytes and memo.rungs == fresh.rungs and memo.left_out == fresh.left_out
