"""The core's weight matching (``tensorscope_core.weight_matching`` through the plugin API), which
interventions.vectors aligns with: a hand permutation of GPT-2's MLP units is found and undone exactly."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from tensorscope_core.plugin_api import align, aligned_bytes, mlp_unit_axes, model_view, permute_units


def test_align_undoes_a_hand_permutation(models) -> None:
    model = AutoModelForCausalLM.from_pretrained(models["gpt2"])
    with model_view(model) as view:
        a = {n: p.detach() for n, p in model.named_parameters()}
        gen = torch.Generator().manual_seed(0)
        perms = [torch.randperm(view.d_mlp, generator=gen) for _ in range(view.n_layers)]
        b = dict(a)
        for layer, perm in enumerate(perms):
            b = permute_units(b, mlp_unit_axes(view, layer), perm)
        aligned, found = align(view, a, b)
        assert all(torch.equal(aligned[n], a[n]) for n in a)
        for layer, perm in enumerate(perms):
            assert torch.equal(perm[found[layer]], torch.arange(view.d_mlp))  # b's unit found[i] is a's unit i
        assert aligned_bytes(view) == sum(
            a[x.name].numel() * 4 for layer in range(view.n_layers) for x in mlp_unit_axes(view, layer)
        )
