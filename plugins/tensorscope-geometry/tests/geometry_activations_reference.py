"""Independent reference activations: hooks placed by hand on a freshly loaded model, one
unpadded sequence at a time (so a padding bug in the metrics cannot hide)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

BLOCKS = {"gpt2": "transformer.h", "llama": "model.layers", "bert": "bert.encoder.layer"}
MLP_OUT = {"gpt2": "mlp.c_proj", "llama": "mlp.down_proj", "bert": "output.dense"}


def load(folder: Path):
    family = AutoConfig.from_pretrained(folder).model_type
    cls = AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM
    return family, cls.from_pretrained(folder, attn_implementation="eager").eval()


def activations(folder: Path, rows: list[torch.Tensor]) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """Per sequence: resid (n_layers + 1 tensors [len, d], float64; the last leaves the final
    block before the final norm) and mlp_hidden (n_layers tensors [len, d_mlp])."""
    family, model = load(folder)
    blocks = model.get_submodule(BLOCKS[family])
    seen: dict[str, list[torch.Tensor]] = {"resid": [], "mlp": []}
    handles = [blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen["resid"].append((args[0] if args else kwargs["hidden_states"])[0]),
        with_kwargs=True)]
    for block in blocks:
        handles.append(block.register_forward_hook(
            lambda m, a, out: seen["resid"].append((out[0] if isinstance(out, tuple) else out)[0])))
        handles.append(block.get_submodule(MLP_OUT[family]).register_forward_pre_hook(
            lambda m, args: seen["mlp"].append(args[0][0])))
    resid_all, mlp_all = [], []
    for row in rows:
        seen["resid"], seen["mlp"] = [], []
        with torch.no_grad():
            model(row[None])
        resid_all.append([r.double() for r in seen["resid"]])
        mlp_all.append([m.double() for m in seen["mlp"]])
    for h in handles:
        h.remove()
    return resid_all, mlp_all


def stacked(per_sequence: list[list[torch.Tensor]], sequences: range | list[int]) -> list[torch.Tensor]:
    """Per layer, the rows of the given sequences stacked [tokens, d]."""
    return [torch.cat([per_sequence[s][layer] for s in sequences]) for layer in range(len(per_sequence[0]))]
