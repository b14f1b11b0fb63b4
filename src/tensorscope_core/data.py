"""Everything a user may pass as data -> the same padded batches for every metric and model."""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .errors import DataError, EmptyDataError, SequenceTooLongError, TokenizerMismatchError
from .models.view import ModelView

DataSpec = Any  # list[str] | str | Path | Tensor | list[Tensor] | DataLoader | Mapping[str, DataSpec]


@dataclass
class Batch:
    """One padded batch (right padding); ``attention_mask`` is 1 on real tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    task: str | None
    index: int
    index_in_task: int = 0

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def slice(self, start: int, stop: int) -> Batch:
        return Batch(self.input_ids[start:stop], self.attention_mask[start:stop], self.task, self.index,
                     self.index_in_task)

    def to(self, device: str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.task, self.index,
                     self.index_in_task)


def pad_rows(rows: Sequence[torch.Tensor], pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D token rows to one [n, longest] tensor and its attention mask."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return ids, mask


@dataclass
class PreparedData:
    """Token sequences per task (None = untasked), in a fixed order, plus bookkeeping."""

    sequences: dict[str | None, list[torch.Tensor]]
    batch_size: int
    pad_token_id: int
    max_batches: int | None = None
    n_truncated: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def tasks(self) -> list[str]:
        return [t for t in self.sequences if t is not None]

    @property
    def n_sequences(self) -> int:
        return sum(len(s) for s in self.sequences.values())

    @property
    def max_seq_len(self) -> int:
        return max(len(s) for seqs in self.sequences.values() for s in seqs)

    def batches(self) -> Iterator[Batch]:
        index = 0
        for task, seqs in self.sequences.items():
            n_batches = 0
            for start in range(0, len(seqs), self.batch_size):
                if self.max_batches is not None and n_batches >= self.max_batches:
                    break
                ids, mask = pad_rows(seqs[start:start + self.batch_size], self.pad_token_id)
                yield Batch(ids, mask, task, index, n_batches)
                index += 1
                n_batches += 1

    def batch_layout(self) -> tuple[tuple[int, int, str | None], ...]:
        """(rows, padded length, task) of each batch in order, without padding anything: what a
        declared cost or pass count may depend on."""
        layout = []
        for task, seqs in self.sequences.items():
            starts = range(0, len(seqs), self.batch_size)
            if self.max_batches is not None:
                starts = starts[:self.max_batches]
            for start in starts:
                rows = seqs[start:start + self.batch_size]
                layout.append((len(rows), max(len(r) for r in rows), task))
        return tuple(layout)

    def used_sequences(self) -> list[torch.Tensor]:
        """The sequences the batches actually hold (``max_batches`` may leave some out)."""
        used: list[torch.Tensor] = []
        for seqs in self.sequences.values():
            limit = len(seqs) if self.max_batches is None else self.max_batches * self.batch_size
            used += seqs[:limit]
        return used

    def n_batches(self) -> int:
        total = 0
        for seqs in self.sequences.values():
            n = -(-len(seqs) // self.batch_size)
            total += min(n, self.max_batches) if self.max_batches else n
        return total

    def fingerprint(self) -> str:
        digest = hashlib.blake2b(digest_size=16)
        digest.update(json.dumps([self.batch_size, self.max_batches]).encode())
        for task, seqs in self.sequences.items():
            digest.update(repr(task).encode())
            for s in seqs:
                digest.update(s.numpy().astype("int64").tobytes() + b"|")
        return digest.hexdigest()



def tasks_skip_reason(data: PreparedData | None, needed: int = 2) -> str | None:
    """Why a metric comparing named tasks does not apply (fewer than ``needed``), or None: the
    ``skip_reason`` of task metrics, one wording for every plugin."""
    tasks = data.tasks if data is not None else []
    if len(tasks) >= needed:
        return None
    return (f"needs data with at least {needed} named tasks, e.g. data={{'math': [...], 'code': [...]}}; "
            f"this run has {len(tasks)} ({', '.join(map(repr, tasks)) or 'untasked data'})")

def builtin_corpus() -> list[str]:
    """The small English corpus shipped in the package (one example per line)."""
    text = resources.files("tensorscope_core").joinpath("corpus/tiny.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise DataError(f"{path} is not UTF-8 text: byte {exc.object[exc.start]:#04x} on line {line} cannot be decoded",
                        "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8), or pass token ids as "
                        ".safetensors/.pt") from exc


def _read_file(path: Path) -> list[str]:
    if not path.exists():
        raise DataError(f"data file {path} does not exist", "pass an existing .txt or .jsonl file")
    if path.suffix == ".jsonl":
        texts = []
        for lineno, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno} is not valid JSON ({exc.msg})",
                                "write one JSON object per line") from exc
            if not isinstance(record, dict) or "text" not in record:
                raise DataError(f"{path}:{lineno} has no 'text' field", 'write lines like {"text": "..."}')
            if not isinstance(record["text"], str):
                raise DataError(f"{path}:{lineno}: 'text' is {json.dumps(record['text'])}, not a string",
                                'write lines like {"text": "..."}; leave out records without text')
            texts.append(record["text"])
        return texts
    return [line for line in _read_text(path).splitlines() if line.strip()]


def _rows_of(tensor: torch.Tensor, mask: torch.Tensor | None) -> list[torch.Tensor]:
    if tensor.dim() == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 2 or tensor.dtype.is_floating_point:
        raise DataError(f"token ids must be an integer tensor [n, seq], got {tuple(tensor.shape)} {tensor.dtype}",
                        "pass input_ids as a LongTensor")
    rows = []
    for r in range(tensor.shape[0]):
        row = tensor[r] if mask is None else tensor[r][mask[r].bool()]
        rows.append(row.long().cpu())
    return rows


def _from_loader(loader: Iterable[Any]) -> list[torch.Tensor]:
    rows: list[torch.Tensor] = []
    for item in loader:
        if isinstance(item, Mapping):
            rows += _rows_of(item["input_ids"], item.get("attention_mask"))
        elif isinstance(item, torch.Tensor):
            rows += _rows_of(item, None)
        elif isinstance(item, (list, tuple)) and item and isinstance(item[0], torch.Tensor):
            rows += _rows_of(item[0], None)
        else:
            raise DataError(f"a DataLoader item of type {type(item).__name__} cannot be read",
                            "yield input_ids tensors or dicts with 'input_ids' (and 'attention_mask')")
    return rows


def _tokenize(texts: list[str], view: ModelView, max_length: int) -> tuple[list[torch.Tensor], int]:
    if view.tokenizer is None:
        raise DataError(f"model {view.name} has no tokenizer, so text cannot be tokenized",
                        "pass token id tensors as data, or save a tokenizer in the model folder")
    rows, truncated = [], 0
    for text in texts:
        ids = view.tokenizer(text, add_special_tokens=True)["input_ids"]
        if len(ids) > max_length:
            truncated += 1
            ids = ids[:max_length]
        rows.append(torch.tensor(ids, dtype=torch.long))
    return rows, truncated


def load_tensor_file(path: Path, what: str, how_to_save: str) -> Any:
    """``torch.load(path, weights_only=True)`` with its failures as DataError: a damaged or cut file,
    or pickled Python objects (which weights_only refuses, as they could run code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path} holds pickled Python objects, which are not loaded (weights_only=True refuses "
                        f"them: they could run code): {str(exc).splitlines()[0]}",
                        f"save only tensors: {how_to_save}") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise DataError(f"{path} cannot be read as a torch file of {what} (damaged, cut short or not a torch "
                        f"file): {str(exc).splitlines()[0]}", f"write it again: {how_to_save}") from exc


def read_token_file(path: Path) -> torch.Tensor:
    """Token ids saved as a tensor: ``.safetensors`` (key ``input_ids``) or ``.pt`` (weights_only)."""
    if not path.exists():
        raise DataError(f"data file {path} does not exist", "pass an existing file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise DataError(f"{path} cannot be read as safetensors ({exc}): the file is damaged or not safetensors",
                            "write it again with safetensors.torch.save_file({'input_ids': ids}, path)") from exc
        if "input_ids" not in tensors:
            raise DataError(f"{path} has no 'input_ids' tensor (it has {sorted(tensors)})",
                            "save token ids with safetensors.torch.save_file({'input_ids': ids}, path)")
        return tensors["input_ids"]
    loaded = load_tensor_file(path, "token ids", "torch.save(input_ids, path)")
    if not isinstance(loaded, torch.Tensor):
        raise DataError(f"{path} does not hold a tensor of token ids", "torch.save(input_ids, path)")
    return loaded


def _sequences(spec: DataSpec, view: ModelView, max_length: int) -> tuple[list[torch.Tensor], int]:
    if isinstance(spec, (str, Path)) and Path(spec).suffix in (".pt", ".safetensors"):
        spec = read_token_file(Path(spec))
    elif isinstance(spec, (str, Path)):
        return _tokenize(_read_file(Path(spec)), view, max_length)
    if isinstance(spec, torch.Tensor):
        rows = _rows_of(spec, None)
    elif isinstance(spec, (list, tuple)) and spec and all(isinstance(s, str) for s in spec):
        return _tokenize([s for s in spec if s.strip()], view, max_length)
    elif isinstance(spec, (list, tuple)) and all(isinstance(s, torch.Tensor) for s in spec):
        rows = [r for s in spec for r in _rows_of(s, None)]
    elif isinstance(spec, (list, tuple)):
        raise DataError("a data list must hold only strings or only token id tensors",
                        "split mixed data into separate runs")
    elif hasattr(spec, "__iter__"):
        rows = _from_loader(spec)
    else:
        raise DataError(f"data of type {type(spec).__name__} is not understood",
                        "pass texts, a .txt/.jsonl path, token id tensors, a DataLoader or {task: data}")
    truncated = sum(1 for r in rows if len(r) > max_length)
    return [r[:max_length] for r in rows], truncated


def _check_ids(rows: list[torch.Tensor], view: ModelView, where: str) -> None:
    top = max((int(r.max()) for r in rows if len(r)), default=0)
    low = min((int(r.min()) for r in rows if len(r)), default=0)
    if top >= view.vocab_size or low < 0:
        raise TokenizerMismatchError(
            f"{where}: token id {top if top >= view.vocab_size else low} is outside the embedding of "
            f"{view.name} ({view.vocab_size} rows)",
            "use the tokenizer saved with this model; token ids must lie in [0, vocab_size)")


DEFAULT_MAX_LENGTH = 128


def materialize(data: DataSpec) -> DataSpec:
    """Read one-shot sources (generators, DataLoaders) once, so every model of a run sees
    the same examples in the same order (a shuffling loader is drawn from only once)."""
    if isinstance(data, Mapping):
        return {task: materialize(spec) for task, spec in data.items()}
    if data is None or isinstance(data, (str, Path, torch.Tensor, list, tuple)):
        return data
    if hasattr(data, "__iter__"):
        return _from_loader(data)
    return data


def prepare_data(data: DataSpec, view: ModelView, *, batch_size: int, max_length: int | None,
                 max_batches: int | None = None) -> PreparedData:
    """Validate and tokenize once per model; every problem is reported before any pass.

    ``max_length=None`` means the model's positions, at most 128; an explicit value above
    the model's positions is refused rather than silently cut.
    """
    if max_length is None:
        max_length = min(DEFAULT_MAX_LENGTH, view.max_positions or DEFAULT_MAX_LENGTH)
    if view.max_positions is not None and max_length > view.max_positions:
        raise SequenceTooLongError(
            f"max_length {max_length} exceeds the {view.max_positions} positions of {view.name}",
            f"set max_length (CLI --max-length) to {view.max_positions} or less")
    if view.tokenizer is not None and len(view.tokenizer) > view.vocab_size:
        raise TokenizerMismatchError(
            f"the tokenizer of {view.name} has {len(view.tokenizer)} tokens but the embedding has "
            f"{view.vocab_size} rows", "load the tokenizer that was trained with this model "
            "(or resize the embeddings with model.resize_token_embeddings)")
    named = data if isinstance(data, Mapping) else {None: data}
    sequences: dict[str | None, list[torch.Tensor]] = {}
    truncated = 0
    for task, spec in named.items():
        rows, cut = _sequences(spec, view, max_length)
        rows = [r for r in rows if len(r) > 0]
        where = f"task '{task}'" if task is not None else "data"
        if not rows:
            raise EmptyDataError(f"{where} holds no tokens", "pass at least one non-empty example")
        _check_ids(rows, view, where)
        sequences[task] = rows
        truncated += cut
    if not sequences:
        raise EmptyDataError("no data was given", "pass texts, a file, token ids or {task: data}")
    notes = [f"{truncated} sequence(s) truncated to max_length {max_length}"] if truncated else []
    return PreparedData(sequences, batch_size, view.pad_token_id, max_batches, truncated, notes)
