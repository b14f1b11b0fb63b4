"""Forwards resumed at a block (``recorded_blocks`` / ``resumed_at``) give the full forward's logits bit for
bit, with an intervention at that block, on GPT-2, LLaMA (grouped-query, rotary) and BERT, padded rows
included; the skipped blocks get their own forward back afterwards, also after an error. Forwards stopped
at a module (``stopped_before``) capture what the full forward would have and run nothing after it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from tensorscope_core.plugin_api import model_view, recorded_blocks, resumed_at, stopped_before
from tensorscope_core.testing import tiny_model


@pytest.fixture(scope="module")
def three_block_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("resume")
    return {family: tiny_model(family, root / family, n_layers=3) for family in ("gpt2", "llama", "bert")}


def _halve_attention_output(layer_attn_out: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """An intervention at the block: the attention output projection's input, halved."""
    def halve(module: torch.nn.Module, args: tuple) -> tuple:
        return (args[0] * 0.5, *args[1:])
    return layer_attn_out.register_forward_pre_hook(halve)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_resumed_forward_equals_the_full_one(three_block_models: dict[str, Path], family: str) -> None:
    model = transformers.AutoModelForMaskedLM.from_pretrained(three_block_models[family]) if family == "bert" \
        else transformers.AutoModelForCausalLM.from_pretrained(three_block_models[family])
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (3, 7), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # a padded row

    def logits() -> torch.Tensor:
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits

    with model_view(model) as view, torch.no_grad():
        with recorded_blocks(view) as outputs:
            clean = logits()
        assert all(o is not None for o in outputs)
        for layer in range(view.n_layers + 1):
            if layer < view.n_layers:
                handles = [_halve_attention_output(view.attn_out[layer])]
            else:  # past the last block: only the final norm and the head run
                handles = []
            full = logits()
            with resumed_at(view, layer, outputs):
                resumed = logits()
            for handle in handles:
                handle.remove()
            assert torch.equal(resumed, full), (family, layer)
            if layer < view.n_layers:
                assert not torch.equal(full, clean), (family, layer)  # the intervention changed something
        assert all("forward" not in block.__dict__ for block in view.blocks)


def test_resumed_at_refuses_what_was_not_recorded_and_restores_on_error(three_block_models: dict[str, Path]) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(three_block_models["gpt2"])
    ids = torch.arange(5, 12).unsqueeze(0)
    with model_view(model) as view, torch.no_grad():
        with pytest.raises(ValueError, match="was not recorded"), resumed_at(view, 2, [None] * view.n_layers):
            pass
        with pytest.raises(ValueError, match="is not a block"), resumed_at(view, view.n_layers + 1, []):
            pass
        with recorded_blocks(view) as outputs:
            model(input_ids=ids, use_cache=False)
        with pytest.raises(RuntimeError, match="boom"), resumed_at(view, 2, outputs):
            assert view.blocks[0](outputs[0]) is outputs[1]  # skipped: returns block 1's recorded output
            raise RuntimeError("boom")
        assert all("forward" not in block.__dict__ for block in view.blocks)
        assert not any(block._forward_hooks for block in view.blocks)  # the recording hooks are gone


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_stopped_forward_keeps_what_the_full_one_would_and_runs_nothing_after(
        three_block_models: dict[str, Path], family: str) -> None:
    model = transformers.AutoModelForMaskedLM.from_pretrained(three_block_models[family]) if family == "bert" \
        else transformers.AutoModelForCausalLM.from_pretrained(three_block_models[family])
    ids = torch.randint(5, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    with model_view(model) as view, torch.no_grad():
        inputs: dict[str, list[torch.Tensor]] = {"full": [], "stopped": []}
        ran: list[str] = []
        side = ["full"]

        def keep(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            inputs[side[0]].append((args[0] if args else kwargs["hidden_states"]).clone())

        handles = [view.blocks[-1].register_forward_pre_hook(keep, with_kwargs=True),
                   view.blocks[-1].register_forward_hook(lambda *_: ran.append("last block")),
                   view.unembed.register_forward_pre_hook(lambda *_: ran.append("unembedding"))]
        model(input_ids=ids, use_cache=False)
        assert ran == ["last block", "unembedding"]
        side[0] = "stopped"
        ran.clear()
        finished = False
        with stopped_before(view.blocks[-1]):
            model(input_ids=ids, use_cache=False)
            finished = True  # not reached: the call stops at the last block
        assert not finished
        assert ran == []  # neither the last block's forward nor the head ran
        assert torch.equal(inputs["stopped"][0], inputs["full"][0])
        assert len(view.blocks[-1]._forward_pre_hooks) == 1  # the stop hook is gone, keep remains
        with pytest.raises(RuntimeError, match="boom"), stopped_before(view.blocks[0]):
            raise RuntimeError("boom")  # another error is not swallowed
        for handle in handles:
            handle.remove()
        assert not view.blocks[0]._forward_pre_hooks
