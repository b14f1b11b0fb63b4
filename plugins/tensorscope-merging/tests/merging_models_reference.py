"""Hand-made model sets for the merging tests: fine-tunes = base + known deltas, MLP-permuted copies,
and registries with only the plugins a test wants (plus throwaway test metrics)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from tensorscope_core import plugins as ts_plugins


def load(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")


def finetune(base: Path, out: Path, deltas: Mapping[str, torch.Tensor]) -> Path:
    """Save ``base`` with ``deltas[name]`` added to the parameters of those names (and its tokenizer)."""
    model = load(base)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, delta in deltas.items():
            params[name].add_(delta.to(params[name].dtype))
    model.save_pretrained(out)
    _copy_tokenizer(base, out)
    return out


def permuted_mlp_copy(base: Path, out: Path, perms: list[torch.Tensor]) -> Path:
    """``base`` with the MLP hidden units of block l reordered by hand: new unit j = old unit perms[l][j].

    GPT-2: ``c_fc`` (Conv1D, weight [d_model, d_mlp]) columns and bias, ``c_proj`` (weight
    [d_mlp, d_model]) rows. LLaMA: ``gate_proj``/``up_proj`` (Linear [d_mlp, d_model]) rows and
    ``down_proj`` (Linear [d_model, d_mlp]) columns. The function is unchanged.
    """
    model = load(base)
    with torch.no_grad():
        for layer, perm in enumerate(perms):
            if model.config.model_type == "gpt2":
                mlp = model.transformer.h[layer].mlp
                mlp.c_fc.weight.copy_(mlp.c_fc.weight[:, perm])
                mlp.c_fc.bias.copy_(mlp.c_fc.bias[perm])
                mlp.c_proj.weight.copy_(mlp.c_proj.weight[perm, :])
            else:
                mlp = model.model.layers[layer].mlp
                mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[perm, :])
                mlp.up_proj.weight.copy_(mlp.up_proj.weight[perm, :])
                mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, perm])
    model.save_pretrained(out)
    _copy_tokenizer(base, out)
    return out


def _copy_tokenizer(base: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    if (base / "tokenizer.json").exists():
        AutoTokenizer.from_pretrained(base).save_pretrained(out)


@contextmanager
def registry(plugins: str, *metrics: type) -> Iterator[ts_plugins.Registry]:
    """Only the entry-point plugins named in ``plugins`` (comma-separated) plus a throwaway plugin
    registering ``metrics``; the previous registry comes back afterwards."""
    saved_env, saved = os.environ.get(ts_plugins.LOAD_ENV), ts_plugins._REGISTRY
    os.environ[ts_plugins.LOAD_ENV] = plugins

    def register_metrics(register: Callable[[type], None]) -> None:
        for cls in metrics:
            register(cls)

    try:
        extra = [("merging-test", ts_plugins.plugin_module("merging_test", register_metrics=register_metrics))] \
            if metrics else []
        ts_plugins._REGISTRY = built = ts_plugins.build_registry(extra_plugins=extra)
        broken = [p for p in built.plugins if p.status != "ok"]
        assert not broken, broken
        yield built
    finally:
        ts_plugins._REGISTRY = saved
        if saved_env is None:
            os.environ.pop(ts_plugins.LOAD_ENV, None)
        else:
            os.environ[ts_plugins.LOAD_ENV] = saved_env
