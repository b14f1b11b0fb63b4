"""``batch_loss`` at weights other than the model's, through the hook-free copy and through a
``OneDeviceModel`` (``trainable_model``), against a float64 reference: a copy of the model with those
weights loaded, its token cross-entropy summed by hand."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tensorscope_core.core_artifacts import loss_targets
from tensorscope_core.data import Batch
from tensorscope_core.plugin_api import batch_loss, model_view, trainable_model
from tensorscope_core.testing import tiny_model


def _reference_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean next-token cross-entropy over the real target tokens, in float64."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    real = (mask[:, 1:] * mask[:, :-1]).double()
    return float((nll * real).sum() / real.sum())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batch_loss_at_other_weights_through_either_route(tmp_path: Path, family: str) -> None:
    folder = tiny_model(family, tmp_path / family, with_tokenizer=False)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0  # a padded row
    batch = Batch(ids, mask, None, 0)
    with model_view(model) as view:
        targets = loss_targets(view, batch, seed=0)
        one_device = trainable_model(view)
        theta = one_device.weights
        moved = {n: t + 0.05 * torch.randn(t.shape, generator=gen) for n, t in theta.items()}
        reference = copy.deepcopy(model)
        reference.load_state_dict(moved, strict=False)  # tied weights: the embedding's value for both
        for params, want in ((None, _reference_loss(model, ids, mask)), (moved, _reference_loss(reference, ids, mask))):
            with torch.no_grad():
                plain = float(batch_loss(view, batch, targets, params))
                loaded = float(batch_loss(view, batch, targets, params, one_device))
            assert plain == pytest.approx(want, rel=1e-6)
            assert loaded == pytest.approx(plain, rel=1e-7)
        # differentiable in the weights passed in, the same gradient by both routes
        leaf = {n: t.clone().requires_grad_(True) for n, t in moved.items()}
        g_plain = torch.autograd.grad(batch_loss(view, batch, targets, leaf), list(leaf.values()))
        g_loaded = torch.autograd.grad(batch_loss(view, batch, targets, leaf, one_device), list(leaf.values()))
        for a, b in zip(g_plain, g_loaded, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())  # the model is untouched
