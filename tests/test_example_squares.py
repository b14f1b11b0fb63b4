"""Per-example gradients' squares summed inside the ``per_example_grads`` artifact (``"squares": True``).

Known answers: each entry's summed square is a float64 brute force's over the consumer's own rows (to
float32 rounding), each example's squared norm likewise; micro-batches add into one running sum for their
batch; a run where every consumer asks for the squares keeps no gradient rows, and the plan declares a
[P] float32 vector per label set instead of [batch, P].
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from core_helpers import whole_and_micro_batched

from tensorscope_core import RunConfig, analyze
from tensorscope_core.capture import tensor_bytes
from tensorscope_core.example_grads import PER_EXAMPLE_GRADS, merge_requests
from tensorscope_core.plugin_api import Metric, NoParams, ScalarValue, model_view
from tensorscope_core.testing import temporary_plugin

CONFIG = RunConfig(batch_size=4, max_length=16, seed=5)
TEXTS = [f"squares test sentence number {i} with a few words" for i in range(8)]
LABELS = ("observed", "sampled")


class Consumer(Metric):
    """A reader of per_example_grads on every parameter and both label sets, with ``squares`` when set."""

    Params = NoParams
    artifacts = ("per_example_grads",)
    squares = False

    @classmethod
    def artifact_requests(cls, params: Any, view: Any) -> dict[str, Any]:
        return {"per_example_grads": {"parameters": None, "labels": LABELS, **({"squares": True} if cls.squares
                                                                             else {})}}


class Rows(Consumer):
    """Keeps the rows of both label sets (float64)."""

    name = "qtest.rows"

    def setup(self) -> None:
        self.rows: dict[str, list[torch.Tensor]] = {label: [] for label in LABELS}

    def update(self, step: Any) -> None:
        for label in LABELS:
            self.rows[label].append(step["per_example_grads"].of(label).double().clone())

    def finalize(self) -> dict[str, object]:
        return {label: torch.cat(rows) for label, rows in self.rows.items()}


class Squares(Consumer):
    """Sums the artifact's summed squares over the run's batches, keeps the norms and the rows it saw."""

    name = "qtest.squares"
    squares = True

    def setup(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.norms: dict[str, list[torch.Tensor]] = {label: [] for label in LABELS}
        self.held = 0

    def update(self, step: Any) -> None:
        g = step["per_example_grads"]
        for label in LABELS:
            total, norms = g.summed_squares(label)
            self.sums[label] = self.sums.get(label, torch.zeros(total.shape, dtype=torch.float64)) + total.double()
            self.norms[label].append(norms.clone())
        self.held = max(self.held, tensor_bytes(g.grads))

    def finalize(self) -> dict[str, object]:
        return {**{f"sum_{label}": s for label, s in self.sums.items()},
                **{f"norms_{label}": torch.cat(n) for label, n in self.norms.items()},
                "held": ScalarValue(value=self.held)}


@pytest.fixture(scope="module")
def registry() -> Iterator[Any]:
    with temporary_plugin("qtest", metrics=[Rows, Squares]) as reg:
        yield reg


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_summed_squares_and_norms_are_the_rows(model_dirs: dict[str, Path], registry: Any, family: str) -> None:
    """Alone (no rows made or kept) and beside a consumer of the rows: the float64 brute force's sums over
    every example and squared norms, for both label sets (GPT-2's tied embedding once, in its layout)."""
    reference = analyze(model_dirs[family], data=TEXTS, metrics=["qtest.rows"], config=CONFIG)
    alone = analyze(model_dirs[family], data=TEXTS, metrics=["qtest.squares"], config=CONFIG)
    together = analyze(model_dirs[family], data=TEXTS, metrics=["qtest.rows", "qtest.squares"], config=CONFIG)
    assert alone.get("qtest.squares").value("held") == 0  # no gradient rows were made
    for label in LABELS:
        rows = reference.tensor("qtest.rows", label)
        for res in (alone, together):
            torch.testing.assert_close(res.tensor("qtest.squares", f"sum_{label}"), (rows * rows).sum(dim=0),
                                       rtol=1e-5, atol=1e-12)
            # float32 norms of 4096-entry chunks, squared and summed in float64 (``row_squares``), as the sketches'
            torch.testing.assert_close(res.tensor("qtest.squares", f"norms_{label}"), (rows * rows).sum(dim=1),
                                       rtol=1e-6, atol=0)


def test_micro_batches_add_into_one_sum_for_their_batch(model_dirs: dict[str, Path], registry: Any) -> None:
    whole, micro = whole_and_micro_batched(model_dirs["llama"], TEXTS, ["qtest.squares"], CONFIG)
    for label in LABELS:
        torch.testing.assert_close(micro.tensor("qtest.squares", f"sum_{label}"),
                                   whole.tensor("qtest.squares", f"sum_{label}"), rtol=1e-5, atol=1e-12)


def test_requests_with_squares_merge_without_rows() -> None:
    merged = merge_requests([{"squares": True}, {"parameters": ["a"], "sketch": 8}])
    assert merged["rows"] is False and merged["squares"] is True
    assert merge_requests([{"squares": True}, {"parameters": None}])["rows"] is True
    assert merge_requests([{"parameters": None}])["squares"] is False
    with pytest.raises(ValueError, match="squares is True or False"):
        merge_requests([{"squares": 1}])


def test_declared_bytes_hold_a_vector_per_label_set(model_dirs: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    size = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest = max(p.numel() for p in model.parameters() if p.requires_grad)
    with model_view(model) as view:
        rows = merge_requests([{"parameters": None, "labels": LABELS}])
        squares = merge_requests([{"parameters": None, "labels": LABELS, "squares": True}])
        assert PER_EXAMPLE_GRADS.bytes_for(view, 4, 16, squares) == 2 * (size * 4 + 4 * 8) + 16 * 4
        extra = PER_EXAMPLE_GRADS.transient_for(view, 2, 16, squares) - PER_EXAMPLE_GRADS.transient_for(
            view, 2, 16, rows)
        # the micro-batch's gradients (no flat copy holds them); a float32 model on the CPU copies none of them
        assert extra == 2 * 2 * size * 4 + 2 * 2 * (1 << 20) * 8
        half = merge_requests([{"parameters": None, "labels": LABELS, "squares": True}])
        with model_view(model.to(torch.bfloat16)) as low:  # bfloat16: the largest gradient in float32 too
            assert PER_EXAMPLE_GRADS.transient_for(low, 2, 16, half) - PER_EXAMPLE_GRADS.transient_for(
                low, 2, 16, merge_requests([{"parameters": None, "labels": LABELS}])) == \
                2 * 2 * size * 2 + 2 * 2 * (1 << 20) * 8 + 2 * largest * 4
