"""Hand-made model sets for the merging tests: fine-tunes = base + known deltas, MLP-permuted copies,
and registries with only the plugins a test wants (plus throwaway test metrics)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from tensorscope_core.testing import temporary_plugin


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
def registry(plugins: str, *metrics: type) -> Iterator[Any]:
    """Only the entry-point plugins named in ``plugins`` (comma-separated) plus a throwaway plugin
    registering ``metrics`` (``tensorscope_core.testing.temporary_plugin``); the previous registry
    comes back afterwards."""
    with temporary_plugin("merging-test", metrics=metrics, only_installed=plugins.split(",")) as built:
        broken = [p for p in built.plugins if p.status != "ok"]
        assert not broken, broken
        yield built
