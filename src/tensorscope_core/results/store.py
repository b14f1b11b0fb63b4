"""Atomic writes and the content-addressed result cache (resume without recomputing)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from .schema import MetricResult


@contextmanager
def atomic_write(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Write to a temporary file beside ``path`` and rename it into place only on success,
    so a killed run never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; results are ordinary files
    try:
        with os.fdopen(fd, mode, newline=None if "b" in mode else "") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable_folder(path: Path, what: str, option: str) -> None:
    """Refuse, before any computing, a folder the run could not write into: one that is a file,
    or under a file, or in a place without write permission. Creates nothing."""
    from ..errors import UsageError

    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"the {what} {path} cannot be a folder: {probe} is a file",
                         f"choose another {option}, or move the file {probe} away")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"the {what} {path} is not writable here ({probe} denies writing)",
                         f"choose an {option} you may write to")


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """``tensors`` as the bytes of a safetensors file."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


#: the lock file a run holds in its out dir while it writes there
LOCK_FILE = ".tensorscope.lock"


@contextmanager
def out_dir_lock(out: Path) -> Iterator[None]:
    """Hold ``out`` for one run: a second run writing the same folder at once is refused (it would
    mix two runs' files). Temporary files of a run killed mid-write (here and in the cache dir) are
    removed; a folder this created and left empty (the run failed) is removed again."""
    import fcntl

    from ..errors import UsageError

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock_path = out / LOCK_FILE
    handle = open(lock_path, "a+")  # noqa: SIM115  (held open for the block)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        handle.close()
        raise UsageError(f"another run is writing into {out} now", "wait for it to finish, or choose another --out"
                         ) from exc
    for stale in [*out.glob(".*.tmp"), *out.glob("*/.*.tmp")]:  # left by a run killed mid-write
        stale.unlink(missing_ok=True)
    try:
        yield
    finally:
        if created and [p.name for p in out.iterdir()] == [LOCK_FILE]:
            lock_path.unlink()
            out.rmdir()
        handle.close()  # releases the lock


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(tensor_bytes(tensors))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        return {}
    from safetensors.torch import load_file

    return load_file(str(path))


def cache_key(**parts: Any) -> str:
    """A stable hash of everything that decides a metric's values."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


class ResultCache:
    """One JSON file per finished metric result (plus its tensors), named by its key. Each entry
    holds a digest of its result and tensor bytes, checked on every read: an entry edited or damaged
    after it was written is recomputed, never served. With ``refresh`` (``force_recompute``) nothing
    is read: every metric is computed again and its entry rewritten."""

    def __init__(self, root: Path, refresh: bool = False) -> None:
        self.root = root
        self.refresh = refresh

    @staticmethod
    def _digest(result_json: str, tensor_bytes: bytes) -> str:
        return hashlib.blake2b(result_json.encode() + b"\0" + tensor_bytes, digest_size=20).hexdigest()

    def get(self, key: str) -> tuple[MetricResult, dict[str, torch.Tensor]] | None:
        path = self.root / f"{key}.json"
        if self.refresh or not path.exists():
            return None
        tensors_path = self.root / f"{key}.safetensors"
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            blob = tensors_path.read_bytes() if tensors_path.exists() else b""
            if not isinstance(entry, dict) or entry.get("digest") != self._digest(entry["result"], blob):
                return None
            result = MetricResult.model_validate_json(entry["result"])
            from safetensors.torch import load

            return result, (load(blob) if blob else {})
        except Exception:  # noqa: BLE001  (any unreadable entry is recomputed, never trusted)
            return None

    def put(self, key: str, result: MetricResult, tensors: Mapping[str, torch.Tensor],
            model: str | None = None) -> None:
        """Write the entry; ``model`` (the model's name, ``*`` for a model set) is kept beside the result
        for ``tensorscope cache`` (entries written before it was kept list their model as unknown)."""
        blob = tensor_bytes(tensors) if tensors else b""
        tensors_path = self.root / f"{key}.safetensors"
        if blob:
            with atomic_write(tensors_path, "wb") as handle:
                handle.write(blob)
        else:
            tensors_path.unlink(missing_ok=True)
        result_json = result.model_dump_json()
        with atomic_write(self.root / f"{key}.json") as handle:
            entry = {"digest": self._digest(result_json, blob), "result": result_json}
            handle.write(json.dumps(entry if model is None else {**entry, "model": model}))


# -- the cache as a folder: what `tensorscope cache ls | stats | clear` reads --------------------
#: an entry's file name: its key (cache_key's 20-byte blake2b digest, as hex)
_ENTRY_NAME = re.compile(r"[0-9a-f]{40}\.(json|safetensors)")
#: what a run keeps in its cache dir besides entries: disk-backed stores' scratch folder
_CACHE_SUBDIRS = frozenset({"scratch"})


@dataclass(frozen=True)
class CacheEntry:
    """One cached metric result as ``tensorscope cache`` lists it."""

    key: str
    model: str | None  # None: an entry written before entries kept their model, without tensors to tell
    metric: str
    version: str
    status: str
    nbytes: int  # the JSON entry plus its tensors file


def open_cache_folder(root: Path) -> Path:
    """``root`` if it is a TensorScope cache (only entry files, temporary files and scratch/ in it);
    anything else is refused, so ``cache clear`` never deletes from a folder it did not write."""
    from ..errors import UsageError

    if not root.is_dir():
        raise UsageError(f"no cache at {root}", "pass the --out folder of `tensorscope analyze` (its cache is "
                                                "OUT/.cache) or the cache dir itself with --cache-dir")
    stray = sorted(p.name for p in root.iterdir()
                   if not (_ENTRY_NAME.fullmatch(p.name) and p.is_file()) and not p.name.endswith(".tmp")
                   and not (p.name in _CACHE_SUBDIRS and p.is_dir()))
    if stray:
        raise UsageError(f"{root} is not a TensorScope cache: it holds {', '.join(stray[:3])}"
                         + (f" and {len(stray) - 3} more" if len(stray) > 3 else ""),
                         "pass the --out folder of `tensorscope analyze` or its .cache folder")
    return root


def _entry_model(entry: Mapping[str, Any], result: Mapping[str, Any]) -> str | None:
    """The model of an entry: kept in it, or (older entries) the first part of a tensor field's key."""
    if isinstance(entry.get("model"), str):
        return str(entry["model"])
    for value in (result.get("values") or {}).values():
        if isinstance(value, dict) and isinstance(value.get("key"), str) and "::" in value["key"]:
            return str(value["key"].split("::")[0])
    return None


def cache_entries(root: Path) -> list[CacheEntry]:
    """Every entry of the cache at ``root`` (an unreadable one as metric ``?``), by model and metric."""
    entries = []
    for path in sorted(open_cache_folder(root).glob("*.json")):
        tensors = path.with_suffix(".safetensors")
        nbytes = path.stat().st_size + (tensors.stat().st_size if tensors.exists() else 0)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            result = json.loads(entry["result"])
            entries.append(CacheEntry(path.stem, _entry_model(entry, result), str(result["metric"]),
                                      str(result.get("version", "")), str(result.get("status", "")), nbytes))
        except (ValueError, KeyError, TypeError):
            entries.append(CacheEntry(path.stem, None, "?", "", "unreadable", nbytes))
    return sorted(entries, key=lambda e: (e.model or "", e.metric, e.key))


def cache_stats(entries: list[CacheEntry]) -> dict[str, Any]:
    """Entries and bytes in all, per model and per (model, metric)."""
    per_model: dict[str, dict[str, int]] = {}
    per_metric: dict[tuple[str, str], dict[str, int]] = {}
    for e in entries:
        model = e.model or "?"
        for row in (per_model.setdefault(model, {"entries": 0, "bytes": 0}),
                    per_metric.setdefault((model, e.metric), {"entries": 0, "bytes": 0})):
            row["entries"] += 1
            row["bytes"] += e.nbytes
    return {"entries": len(entries), "bytes": sum(e.nbytes for e in entries),
            "models": [{"model": m, **row} for m, row in sorted(per_model.items())],
            "metrics": [{"model": m, "metric": n, **row} for (m, n), row in sorted(per_metric.items())]}


def remove_entries(root: Path, entries: list[CacheEntry]) -> int:
    """Delete ``entries`` (JSON and tensors) from the cache at ``root``; returns the bytes freed."""
    for e in entries:
        (root / f"{e.key}.json").unlink(missing_ok=True)
        (root / f"{e.key}.safetensors").unlink(missing_ok=True)
    return sum(e.nbytes for e in entries)
