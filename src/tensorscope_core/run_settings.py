"""Run settings resolved or applied around a run: ``device``/``dtype`` "auto" and ``deterministic``.

"auto" is resolved once, before anything loads, so the recorded config shows what ran (not "auto");
deterministic mode changes process-wide torch state, so it is undone when the run ends.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import RunConfig
from .models.load import ModelSource

#: the cuBLAS workspace setting CUDA needs for deterministic matrix products (CUDA docs, "Reproducibility")
CUBLAS_WORKSPACE = ":4096:8"
FLOAT_DTYPES = ("float32", "float64", "bfloat16", "float16")


def auto_device() -> str:
    """cuda if a CUDA device is visible, else mps where available, else cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _config_json(src: ModelSource) -> Path | None:
    """The config.json a source is described by: its folder's, or its base config's (bare state dicts)."""
    if not isinstance(src.source, (str, os.PathLike)):
        return None
    for folder in (Path(src.source), Path(src.base_config) if src.base_config else None):
        if folder is not None and (folder / "config.json").is_file():
            return folder / "config.json"
    return None


def declared_dtype(src: ModelSource) -> str | None:
    """The float dtype a checkpoint declares (``torch_dtype``, or ``dtype`` in newer transformers), if any."""
    declared: object = None
    if isinstance(src.source, torch.nn.Module):
        config = getattr(src.source, "config", None)
        declared = getattr(config, "torch_dtype", None) if config is not None else None
    elif (path := _config_json(src)) is not None:
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # an unreadable config.json is the loader's to report
        declared = raw.get("torch_dtype", raw.get("dtype")) if isinstance(raw, dict) else None
    text = str(declared).removeprefix("torch.") if declared is not None else ""
    return text if text in FLOAT_DTYPES else None


def resolve_auto(config: RunConfig, sources: Sequence[ModelSource]) -> tuple[RunConfig, list[str]]:
    """``config`` with "auto" device and dtype replaced by the choice, and a note saying each choice."""
    update: dict[str, str] = {}
    notes: list[str] = []
    if config.device == "auto":
        update["device"] = auto_device()
        notes.append(f"device 'auto': {update['device']} (cuda if available, else mps, else cpu)")
    if config.dtype == "auto":
        declared = [d for d in (declared_dtype(s) for s in sources) if d is not None]
        update["dtype"] = declared[0] if declared else "float32"
        why = ("the torch_dtype of the first model's config.json" if declared
               else "no model declares a float torch_dtype")
        if len(set(declared)) > 1:
            why += f"; the models declare {sorted(set(declared))}, one dtype runs them all"
        notes.append(f"dtype 'auto': {update['dtype']} ({why})")
    return (config.model_copy(update=update) if update else config), notes


@contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """Deterministic torch algorithms (an op without one raises) and cuBLAS's fixed workspace for the
    block; the process's previous settings are put back afterwards, also on error."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    env_before = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE  # read by cuBLAS when a handle is created
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
        if env_before is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = env_before
