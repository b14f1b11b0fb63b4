"""Atomic writes and the content-addressed result cache (resume without recomputing)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
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


def save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save

    blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    with atomic_write(path, "wb") as handle:
        handle.write(blob)


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
    """One JSON file per finished metric result (plus its tensors), named by its key."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def get(self, key: str) -> tuple[MetricResult, dict[str, torch.Tensor]] | None:
        path = self.root / f"{key}.json"
        if not path.exists():
            return None
        try:
            result = MetricResult.model_validate_json(path.read_text())
        except ValueError:
            return None  # an unreadable entry is recomputed, never trusted
        return result, load_tensors(self.root / f"{key}.safetensors")

    def put(self, key: str, result: MetricResult, tensors: Mapping[str, torch.Tensor]) -> None:
        if tensors:
            save_tensors(tensors, self.root / f"{key}.safetensors")
        with atomic_write(self.root / f"{key}.json") as handle:
            handle.write(result.model_dump_json())
