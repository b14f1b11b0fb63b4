"""Every accepted data form gives the same batches; every data problem is a typed error
raised by analyze() before any pass runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from core_helpers import view_of
from torch.utils.data import DataLoader, TensorDataset

from tensorscope_core import RunConfig, analyze, builtin_corpus
from tensorscope_core.data import prepare_data
from tensorscope_core.errors import DataError, EmptyDataError, SequenceTooLongError, TokenizerMismatchError
from tensorscope_core.models.view import ModelView
from tensorscope_core.testing import random_token_data, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("basic_only")

CFG = RunConfig(batch_size=4, max_length=32)


@pytest.fixture(scope="module")
def view(model_dirs: dict[str, Path], basic_registry: Any) -> ModelView:
    return view_of(model_dirs["gpt2"], basic_registry)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return builtin_corpus()[:10]


@pytest.fixture(scope="module")
def text_rows(view: ModelView, texts: list[str]) -> list[torch.Tensor]:
    """What the model's tokenizer makes of ``texts``, one 1-D tensor per text."""
    return [torch.tensor(view.tokenizer(t, add_special_tokens=True)["input_ids"]) for t in texts]


def batches(data: Any, view: ModelView, batch_size: int = 4, max_length: int = 32,
            max_batches: int | None = None) -> list[tuple[list[list[int]], list[list[int]], str | None, int]]:
    prepared = prepare_data(data, view, batch_size=batch_size, max_length=max_length, max_batches=max_batches)
    return [(b.input_ids.tolist(), b.attention_mask.tolist(), b.task, b.index) for b in prepared.batches()]


def padded_loader(rows: list[torch.Tensor], batch_size: int, pad: int = 0) -> DataLoader:
    length = max(len(r) for r in rows)
    items = []
    for r in rows:
        ids = torch.full((length,), pad, dtype=torch.long)
        ids[:len(r)] = r
        mask = torch.zeros(length, dtype=torch.long)
        mask[:len(r)] = 1
        items.append({"input_ids": ids, "attention_mask": mask})
    return DataLoader(items, batch_size=batch_size)


def test_text_forms_agree(view: ModelView, texts: list[str], text_rows: list[torch.Tensor], tmp_path: Path) -> None:
    want = batches(texts, view)
    # Known answer: right-padded with the pad id, mask 1 exactly on each text's tokens.
    assert [len(b[0]) for b in want] == [4, 4, 2] and [b[3] for b in want] == [0, 1, 2]
    flat_ids = [row for b in want for row in b[0]]
    flat_mask = [row for b in want for row in b[1]]
    for ids, mask, row in zip(flat_ids, flat_mask, text_rows, strict=True):
        n = len(row)
        assert ids[:n] == row.tolist() and set(ids[n:]) <= {view.pad_token_id}
        assert mask == [1] * n + [0] * (len(mask) - n)

    txt = tmp_path / "data.txt"
    txt.write_text("\n".join(texts[:5]) + "\n\n" + "\n".join(texts[5:]) + "\n", encoding="utf-8")
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)) + "\n\n",
                     encoding="utf-8")
    assert batches(str(txt), view) == want
    assert batches(txt, view) == want
    assert batches(jsonl, view) == want
    assert batches(text_rows, view) == want  # list of 1-D token id tensors
    assert batches(padded_loader(text_rows, batch_size=3), view) == want  # re-batched to batch_size


def test_tensor_forms_agree(view: ModelView) -> None:
    ids = random_token_data(64, n=10, length=6, seed=2)
    want = batches(ids, view)
    assert [torch.tensor(b[0]).shape for b in want] == [(4, 6), (4, 6), (2, 6)]
    assert torch.equal(torch.cat([torch.tensor(b[0]) for b in want]), ids)
    assert all(all(v == 1 for row in b[1] for v in row) for b in want)
    assert batches([ids[:3], ids[3:]], view) == want
    assert batches(list(ids), view) == want  # list of 1-D rows
    assert batches(DataLoader(TensorDataset(ids), batch_size=3), view) == want  # yields [tensor]
    assert batches(DataLoader(ids, batch_size=7), view) == want  # yields tensors
    assert batches(DataLoader([{"input_ids": r} for r in ids], batch_size=5), view) == want  # dicts, no mask
    # a single sequence as a 1-D tensor is one row
    assert batches(ids[0], view) == [([ids[0].tolist()], [[1] * 6], None, 0)]


def test_named_tasks_batch_separately(view: ModelView, texts: list[str]) -> None:
    ids = random_token_data(64, n=6, length=5, seed=4)
    got = batches({"a": texts[:5], "b": ids}, view)
    assert [(b[2], len(b[0])) for b in got] == [("a", 4), ("a", 1), ("b", 4), ("b", 2)]
    assert [b[3] for b in got] == [0, 1, 2, 3]
    alone_a, alone_b = batches(texts[:5], view), batches(ids, view)
    assert [b[:2] for b in got[:2]] == [b[:2] for b in alone_a]
    assert [b[:2] for b in got[2:]] == [b[:2] for b in alone_b]
    prepared = prepare_data({"a": texts[:5], "b": ids}, view, batch_size=4, max_length=32)
    assert prepared.tasks == ["a", "b"] and prepared.n_sequences == 11 and prepared.n_batches() == 4
    # max_batches caps each task
    capped = batches({"a": texts[:5], "b": ids}, view, max_batches=1)
    assert [(b[2], len(b[0])) for b in capped] == [("a", 4), ("b", 4)]


def test_named_tasks_loss_per_task_equals_each_task_alone(model_dirs: dict[str, Path], texts: list[str]) -> None:
    ids = random_token_data(64, n=6, length=8, seed=5)
    folder = str(model_dirs["gpt2"])
    both = analyze(folder, data={"a": texts[:6], "b": ids}, metrics=["basic.loss"], config=CFG).get("basic.loss")
    only_a = analyze(folder, data=texts[:6], metrics=["basic.loss"], config=CFG).get("basic.loss")
    only_b = analyze(folder, data=ids, metrics=["basic.loss"], config=CFG).get("basic.loss")
    assert both.value("loss/a") == pytest.approx(only_a.value("loss"), rel=1e-12)
    assert both.value("loss/b") == pytest.approx(only_b.value("loss"), rel=1e-12)
    n_a, n_b = only_a.values["loss"].n, only_b.values["loss"].n
    assert n_b == 6 * 7  # causal: every position but the last predicts the next token
    pooled = (only_a.value("loss") * n_a + only_b.value("loss") * n_b) / (n_a + n_b)
    assert both.value("loss") == pytest.approx(pooled, rel=1e-9)


def test_truncation_to_max_length_is_noted(view: ModelView) -> None:
    ids = random_token_data(64, n=3, length=10, seed=6)
    prepared = prepare_data(ids, view, batch_size=4, max_length=6)
    (batch,) = list(prepared.batches())
    assert torch.equal(batch.input_ids, ids[:, :6])
    assert prepared.n_truncated == 3 and "3 sequence(s) truncated to max_length 6" in prepared.notes


def test_data_fingerprint_follows_the_tokens(view: ModelView) -> None:
    ids = random_token_data(64, n=4, length=6, seed=7)
    one = prepare_data(ids, view, batch_size=2, max_length=32).fingerprint()
    assert one == prepare_data(list(ids), view, batch_size=2, max_length=32).fingerprint()
    changed = ids.clone()
    changed[0, 0] += 1
    assert one != prepare_data(changed, view, batch_size=2, max_length=32).fingerprint()
    assert one != prepare_data(ids, view, batch_size=3, max_length=32).fingerprint()


def test_jsonl_line_without_text_names_the_line(view: ModelView, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "the cat"}\n{"body": "no text here"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2 has no 'text' field"):
        prepare_data(path, view, batch_size=2, max_length=32)
    path.write_text('{"text": "the cat"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2 is not valid JSON"):
        prepare_data(path, view, batch_size=2, max_length=32)


@pytest.mark.parametrize("bad", [
    pytest.param(torch.rand(2, 5), id="float tensor"),
    pytest.param(["text", torch.ones(3, dtype=torch.long)], id="mixed list"),
    pytest.param(42, id="number"),
    pytest.param("no/such/file.txt", id="missing file"),
])
def test_unreadable_data_is_a_data_error(view: ModelView, bad: Any) -> None:
    with pytest.raises(DataError):
        prepare_data(bad, view, batch_size=2, max_length=32)


# -- errors raised by analyze() before any pass -------------------------------------------


class Counted:
    """A GPT-2 module (no tokenizer) that counts its forward calls."""

    def __init__(self, folder: Path) -> None:
        import transformers

        self.module = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        self.calls = 0
        self.module.register_forward_pre_hook(self._count)

    def _count(self, module: Any, args: Any) -> None:
        self.calls += 1


@pytest.fixture
def counted(model_dirs: dict[str, Path]) -> Counted:
    return Counted(model_dirs["gpt2_notok"])  # vocabulary 64, 64 positions, no tokenizer


@pytest.fixture
def counted_340(model_dirs: dict[str, Path]) -> Counted:
    return Counted(model_dirs["gpt2"])  # vocabulary 340: the size of tiny_tokenizer()


def _bad_cases(tmp_path: Path) -> list[tuple[str, Any, dict[str, Any], type[Exception], str]]:
    empty_txt = tmp_path / "empty.txt"
    empty_txt.write_text("\n\n", encoding="utf-8")
    good = random_token_data(64, n=4, length=6)
    return [
        ("empty list", [], {}, EmptyDataError, "no tokens"),
        ("blank texts", ["", "  "], {"tokenizer": tiny_tokenizer(), "vocab": 340}, EmptyDataError, "no tokens"),
        ("empty file", empty_txt, {"tokenizer": tiny_tokenizer(), "vocab": 340}, EmptyDataError, "no tokens"),
        ("empty tensor", torch.zeros(0, 5, dtype=torch.long), {}, EmptyDataError, "no tokens"),
        ("empty task", {"a": good, "b": []}, {}, EmptyDataError, "task 'b'"),
        ("no tasks", {}, {}, EmptyDataError, "no data"),
        ("id >= vocab", torch.tensor([[5, 6, 64, 7]]), {}, TokenizerMismatchError, "token id 64"),
        ("negative id", torch.tensor([[5, -1, 7]]), {}, TokenizerMismatchError, "token id -1"),
        ("tokenizer > embedding", good, {"tokenizer": tiny_tokenizer()}, TokenizerMismatchError,
         "but the embedding has 64 rows"),
        ("max_length > positions", good, {"config": RunConfig(batch_size=4, max_length=65)}, SequenceTooLongError,
         "exceeds the 64 positions"),
        ("text without tokenizer", ["the cat sat"], {}, DataError, "no tokenizer"),
    ]


@pytest.mark.parametrize("case", range(11))
def test_data_errors_come_before_any_pass(counted: Counted, counted_340: Counted, tmp_path: Path,
                                          case: int) -> None:
    name, data, kwargs, error, text = _bad_cases(tmp_path)[case]
    kwargs.setdefault("config", CFG)
    model = counted_340 if kwargs.pop("vocab", 64) == 340 else counted
    with pytest.raises(error, match=text):
        analyze(model.module, data=data, metrics=["basic.loss", "basic.weight_norms"], **kwargs)
    assert model.calls == 0, name


def test_max_length_error_names_the_limit_and_fix(counted: Counted) -> None:
    with pytest.raises(SequenceTooLongError) as info:
        analyze(counted.module, data=random_token_data(64, n=2, length=4), metrics=["basic.loss"],
                config=RunConfig(max_length=100))
    assert info.value.fix == "set max_length (CLI --max-length) to 64 or less"


def test_second_models_data_error_stops_the_run_before_the_first_model_runs(counted: Counted,
                                                                             counted_340: Counted) -> None:
    """Every model's data is checked before any model's pass: the id 100 fits the 340-token
    GPT-2 but not the 64-token one listed second."""
    data = torch.tensor([[4, 5, 100, 6], [7, 8, 9, 10]])
    with pytest.raises(TokenizerMismatchError, match="token id 100"):
        analyze({"big": counted_340.module, "small": counted.module}, data=data, metrics=["basic.loss"], config=CFG)
    assert counted_340.calls == 0 and counted.calls == 0
