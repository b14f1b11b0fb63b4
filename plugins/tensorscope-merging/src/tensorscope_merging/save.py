"""Write a merged model atomically: a reader never finds a half-written file or folder."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from tensorscope_core.plugin_api import ModelView, atomic_write


def merged_state(view: ModelView, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base's state dict with the merged parameters in place; a tied tensor is kept once
    (under its first name), as ``safetensors`` requires and the core's loader accepts."""
    state: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, tensor in view.model.state_dict().items():
        key = (tensor.data_ptr(), tensor.numel())
        if key in seen:
            continue
        seen.add(key)
        state[name] = weights[name].detach() if name in weights else tensor.detach()
    return {k: v.cpu().contiguous() for k, v in state.items()}


def save_merged(view: ModelView, weights: Mapping[str, torch.Tensor], path: Path) -> Path:
    """``*.safetensors``: a bare state dict (load it with ``base_config=`` the base's folder);
    any other path: a Hugging Face folder (config, ``model.safetensors``, tokenizer) like the input's.

    The file or folder is written beside ``path`` under a temporary name and renamed into
    place only when complete; an existing folder is replaced.
    """
    state = merged_state(view, weights)
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        with atomic_write(path, "wb") as handle:
            handle.write(save(state))
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        module = view.model
        module.save_pretrained(tmp, state_dict=state)  # type: ignore[operator]
        if view.tokenizer is not None:
            view.tokenizer.save_pretrained(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            path.replace(old / path.name)
            tmp.replace(path)
            shutil.rmtree(old)
        else:
            tmp.replace(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
