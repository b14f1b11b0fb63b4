"""Per-example gradients sketched inside the ``per_example_grads`` artifact (``"sketch": k`` requests).

Known answers: the artifact's sketch of each example's gradient is the consumer's own ``CountSketch`` of the
full gradient rows, bit for bit (the same additions into each bucket, in the same order, one parameter at a
time), on GPT-2 (tied embedding) and a LLaMA with grouped-query attention, whole and micro-batched, on every
parameter and on a subset; the squared norms are a float64 brute force's; a run where every consumer asks for
a sketch keeps no gradient rows, and the plan declares k-wide rows instead of P-wide ones.
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
from tensorscope_core.plugin_api import CountSketch, Metric, Params, ScalarValue, model_view
from tensorscope_core.testing import temporary_plugin, tiny_model

K = 64
SEED = 3
CONFIG = RunConfig(batch_size=4, max_length=16, seed=SEED)
TEXTS = [f"sketch test sentence number {i} with a few words" for i in range(8)]


class SketchParams(Params):
    parameters: list[str] | None = None


class Consumer(Metric):
    """A reader of per_example_grads on ``parameters``, with ``sketch`` in its request when set."""

    Params = SketchParams
    artifacts = ("per_example_grads",)
    sketch: int | None = None

    @classmethod
    def artifact_requests(cls, params: SketchParams, view: Any) -> dict[str, Any]:
        request: dict[str, Any] = {"parameters": params.parameters, "labels": ("observed",)}
        return {"per_example_grads": request if cls.sketch is None else {**request, "sketch": cls.sketch}}


class Rows(Consumer):
    """Asks for the full gradient rows, and sketches them itself, as a projecting metric did."""

    name = "ktest.rows"

    def setup(self) -> None:
        self.rows: list[torch.Tensor] = []

    def update(self, step: Any) -> None:
        g = step["per_example_grads"]
        names = list(g.layout) if self.params.parameters is None else \
            [n for n in g.layout if n in self.params.parameters]
        self.rows.append(g.of("observed", names).double().clone())

    def finalize(self) -> dict[str, object]:
        rows = torch.cat(self.rows)
        return {"rows": rows, "sketch": CountSketch(rows.shape[1], K, SEED)(rows)}


class Sketched(Consumer):
    """Asks for the sketch only; keeps it, its squared norms and the bytes the artifact held."""

    name = "ktest.sketched"
    sketch = K

    def setup(self) -> None:
        self.sketches: list[torch.Tensor] = []
        self.squares: list[torch.Tensor] = []
        self.held = 0

    def update(self, step: Any) -> None:
        g = step["per_example_grads"]
        sketched = g.sketched(self.params.parameters, K)
        assert sketched is not None
        self.sketches.append(sketched[0].clone())
        self.squares.append(sketched[1].clone())
        self.held = max(self.held, tensor_bytes(g.grads))

    def finalize(self) -> dict[str, object]:
        return {"sketch": torch.cat(self.sketches), "squares": torch.cat(self.squares),
                "held": ScalarValue(value=self.held)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sketch")
    return {family: tiny_model(family, root / family) for family in ("gpt2", "llama")}


@pytest.fixture(scope="module")
def registry() -> Iterator[Any]:
    with temporary_plugin("ktest", metrics=[Rows, Sketched]) as reg:
        yield reg


def _subset(folder: Path) -> list[str]:
    from transformers import AutoModelForCausalLM

    names = [n for n, _ in AutoModelForCausalLM.from_pretrained(folder).named_parameters()]
    return [n for n in names if ".1." in n or n.endswith("norm.weight") or "ln_f" in n]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("subset", [False, True])
def test_artifact_sketch_is_the_consumers_sketch_bit_for_bit(folders: dict[str, Path], registry: Any,
                                                             family: str, subset: bool) -> None:
    params = {"parameters": _subset(folders[family])} if subset else {}
    both = {"ktest.rows": params, "ktest.sketched": params}
    reference = analyze(folders[family], data=TEXTS, metrics=["ktest.rows"], params={"ktest.rows": params},
                        config=CONFIG)
    alone = analyze(folders[family], data=TEXTS, metrics=["ktest.sketched"], params={"ktest.sketched": params},
                    config=CONFIG)
    rows = reference.tensor("ktest.rows", "rows")
    assert torch.equal(alone.tensor("ktest.sketched", "sketch"), reference.tensor("ktest.rows", "sketch"))
    brute = (rows * rows).sum(dim=1)  # float64 rows: the brute force
    torch.testing.assert_close(alone.tensor("ktest.sketched", "squares"), brute, rtol=1e-6, atol=0)
    assert alone.get("ktest.sketched").value("held") == 0  # no gradient rows were kept
    # beside a consumer of the rows, the sketch is made from the same gradients: the same bits
    together = analyze(folders[family], data=TEXTS, metrics=["ktest.rows", "ktest.sketched"], params=both,
                       config=CONFIG)
    assert torch.equal(together.tensor("ktest.sketched", "sketch"), reference.tensor("ktest.rows", "sketch"))


def test_micro_batched_sketches_join_into_the_whole_batchs(folders: dict[str, Path], registry: Any) -> None:
    whole, micro = whole_and_micro_batched(folders["llama"], TEXTS, ["ktest.sketched"], CONFIG)
    torch.testing.assert_close(micro.tensor("ktest.sketched", "sketch"), whole.tensor("ktest.sketched", "sketch"),
                               rtol=1e-5, atol=1e-7)


def test_of_parts_equals_the_sketch_of_the_concatenation() -> None:
    gen = torch.Generator().manual_seed(0)
    size = 2 * CountSketch.SPAN + 777
    rows = torch.randn(3, size, generator=gen)
    sketch = CountSketch(size, 32, 5)
    cuts = [0, 10, CountSketch.SPAN - 3, CountSketch.SPAN + 9, 2 * CountSketch.SPAN + 700, size]
    assert torch.equal(sketch.of_parts([rows[:, a:b] for a, b in zip(cuts, cuts[1:], strict=False)]), sketch(rows))
    with pytest.raises(ValueError, match="the sketch takes"):
        sketch.of_parts([rows[:, :100]])


def test_requests_merge_into_rows_and_distinct_sketches() -> None:
    merged = merge_requests([{"parameters": ["b", "a"], "sketch": 8}, {"parameters": ["a", "b"], "sketch": 8},
                             {"parameters": None, "sketch": 16}])
    assert merged["rows"] is False and merged["parameters"] is None
    assert set(merged["sketches"]) == {(("a", "b"), 8), (None, 16)}
    assert merge_requests([{"sketch": 8}, {"parameters": ["a"]}])["rows"] is True
    assert merge_requests([])["rows"] is True  # no consumer named: the gradients, as before
    for bad in (0, 2.5, True, "8"):
        with pytest.raises(ValueError, match="sketch is a number of dimensions"):
            merge_requests([{"sketch": bad}])


def test_declared_bytes_hold_k_wide_rows_and_the_micro_batchs_gradients(folders: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folders["llama"])
    size = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with model_view(model) as view:
        rows = merge_requests([{"parameters": None}])
        sketched = merge_requests([{"parameters": None, "sketch": K}])
        assert PER_EXAMPLE_GRADS.bytes_for(view, 4, 16, rows) == 4 * size * view.dtype_bytes + 16 * 4
        assert PER_EXAMPLE_GRADS.bytes_for(view, 4, 16, sketched) == 4 * (K + 1) * 8 + 16 * 4
        extra = PER_EXAMPLE_GRADS.transient_for(view, 2, 16, sketched) - PER_EXAMPLE_GRADS.transient_for(
            view, 2, 16, rows)
        assert extra == 2 * size * view.dtype_bytes + 2 * 2 * CountSketch.SPAN * 8


def test_a_tied_embedding_named_in_a_sketch_request_counts_as_when_every_parameter_is(
        folders: dict[str, Path]) -> None:
    """GPT-2 ties its head to the embedding: a sketching backward holds that weight's two gradients (one per
    use) beside every other gradient whether the request names every parameter or says None; a subset
    without it does not."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folders["gpt2"])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    with model_view(model) as view:
        assert view.tied_embedding_bytes > 0

        def transient(parameters: list[str] | None) -> int:
            return PER_EXAMPLE_GRADS.transient_for(view, 2, 16, merge_requests([{"parameters": parameters,
                                                                                "sketch": K}]))

        assert names[0] == "transformer.wte.weight"
        assert transient(names) == transient(None)
        # without the embedding: neither its pair (2 rows x 2 copies) nor its own gradient (2 rows) is held
        assert transient(names) - transient(names[1:]) == (2 * 2 + 2) * view.tied_embedding_bytes
