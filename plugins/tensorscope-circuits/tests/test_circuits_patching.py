"""circuits.patching: exact answers (a patch that makes the whole input or the whole output
clean restores exactly 1, one that changes nothing exactly 0), a linear model in closed form,
head patches against an independent hand computation through W_O, and bad input."""

from __future__ import annotations

import pytest
import torch
from circuits_toy_reference import ToyLM, toy_adapter
from tensorscope_circuits.patching import Patcher
from transformers import AutoModelForCausalLM, AutoTokenizer

from tensorscope_core import ModelSource, analyze
from tensorscope_core.models.load import load_model  # core internal: no public loader of a ModelView
from tensorscope_core.plugin_api import BadParameterError
from tensorscope_core.plugins import get_registry  # core internal: the installed adapters, for load_model

METRIC = "circuits.patching"
CLEAN = ["the cat came on the old boat", "a boat came to the old bridge"]  # words of the tiny vocabulary
CORRUPT = ["the cat came on the new boat", "a boat came to the new bridge"]  # only position 5 differs
PAIRS = {"clean": CLEAN, "corrupted": CORRUPT, "answer": ["river", "sea"], "wrong": ["tower", "door"]}
DIFFERS = 5


def patched(folder, params, **kw):
    res = analyze(folder, metrics=[METRIC], params={METRIC: params}, **kw)
    return res, res.get(METRIC)


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox", "bert"])
def test_patches_that_make_the_input_or_output_clean_restore_exactly_one(family, models, neox_model):
    position = -1 if family != "bert" else 3
    folder = neox_model if family == "neox" else models[family]
    res, result = patched(folder, {**PAIRS, "position": position})
    assert result.ok, result.reason
    grid = res.tensor(METRIC, "resid")
    t, last = grid.shape[1], grid.shape[0] - 1
    read = position % t
    # resid[0] at the only differing position makes the whole input clean; elsewhere it changes nothing
    assert grid[0, DIFFERS] == 1.0 and (grid[0, torch.arange(t) != DIFFERS] == 0.0).all()
    # the last block's output at the read position is all the logits there depend on
    assert grid[last, read] == 1.0 and (grid[last, torch.arange(t) != read] == 0.0).all()
    if family != "bert":  # causal: before the differing position both runs are the same
        assert (grid[:, :DIFFERS] == 0.0).all()
    assert result.value("logit_diff_clean") != result.value("logit_diff_corrupted")


def test_whole_residual_patches_restore_one(models):
    view = load_model(ModelSource(models["gpt2"]), get_registry().adapters)
    ids = [torch.tensor([view.tokenizer(t)["input_ids"] for t in texts]) for texts in (CLEAN, CORRUPT)]
    answer, wrong = (torch.tensor(view.tokenizer(PAIRS[k], add_special_tokens=False)["input_ids"])[:, 0]
                     for k in ("answer", "wrong"))
    patcher = Patcher(view, ids[0], ids[1], answer, wrong, ids[0].shape[1] - 1, heads=False)
    assert patcher.resid(view.n_layers, slice(None)) == 1.0  # every position of the last layer's output
    assert patcher.resid(0, slice(None)) == 1.0  # the layer-0 residual at all positions


def test_linear_model_in_closed_form():
    """LD = (u_a - u_w) . h1[T-1] with h1_t = e_t + mean_{s<=t} e_s: patching resid[0] at p restores
    u.(e_clean,p - e_corr,p) (1/T + [p = T-1]) / (LD_clean - LD_corr); resid[1] only at T-1."""
    model = ToyLM(vocab=16, d=8, seed=3)
    clean, corrupt = [[3, 5, 7, 9]], [[3, 6, 8, 9]]
    res, result = patched(model, {"clean": clean, "corrupted": corrupt, "answer": [10], "wrong": [11],
                                  "heads": False}, adapter=toy_adapter())
    assert result.ok, result.reason
    with torch.no_grad():
        e = model.tok.weight.double()
        u = model.head.weight.double()[10] - model.head.weight.double()[11]
        ec, ex = e[clean[0]], e[corrupt[0]]
        t = len(clean[0])
        total = u @ ((ec - ex)[-1] + (ec - ex).mean(0))
        weight = torch.full((t,), 1 / t, dtype=torch.float64)
        weight[-1] += 1
        want0 = ((ec - ex) @ u) * weight / total
    grid = res.tensor(METRIC, "resid")
    torch.testing.assert_close(grid[0], want0, rtol=1e-6, atol=1e-7)
    assert grid[1, -1] == 1.0 and (grid[1, :-1] == 0.0).all()
    # the generic adapter maps no attention output projection here: head patching says so
    _, heads = patched(model, {"clean": clean, "corrupted": corrupt, "answer": [10], "wrong": [11]},
                       adapter=toy_adapter())
    assert heads.status == "skipped" and "attn_out" in heads.reason and "heads=False" in heads.reason


def head_reference(folder, family, layer, head):
    """Corrupted run plus (z_clean - z_corrupt)_h @ W_O[h] added to the output projection's output."""
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(folder)
    clean, corrupt = (torch.tensor([tok(t)["input_ids"] for t in texts]) for texts in (CLEAN, CORRUPT))
    proj = model.transformer.h[layer].attn.c_proj if family == "gpt2" else model.model.layers[layer].self_attn.o_proj
    w = proj.weight if family == "gpt2" else proj.weight.T  # [in, out]
    rows = slice(8 * head, 8 * head + 8)
    seen = {}
    handle = proj.register_forward_hook(lambda m, a, out: seen.__setitem__("z", a[0]))
    answer, wrong = (torch.tensor(tok(list(x), add_special_tokens=False)["input_ids"])[:, 0]
                     for x in (PAIRS["answer"], PAIRS["wrong"]))

    def ld(ids):
        logits = model(ids).logits[:, -1]
        return float((logits[[0, 1], answer] - logits[[0, 1], wrong]).mean())

    with torch.no_grad():
        ld_clean = ld(clean)
        z_clean = seen["z"]
        ld_corrupt = ld(corrupt)
        z_corrupt = seen["z"]
        handle.remove()
        shift = (z_clean - z_corrupt)[..., rows] @ w[rows]
        handle = proj.register_forward_hook(lambda m, a, out: out + shift)
        ld_patched = ld(corrupt)
        handle.remove()
    return (ld_patched - ld_corrupt) / (ld_clean - ld_corrupt)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_head_patches_match_the_hand_computation(family, models):
    _, result = patched(models[family], PAIRS)
    for layer, head in ((0, 2), (1, 1)):
        assert result.value("heads")[layer][head] == pytest.approx(head_reference(models[family], family, layer, head),
                                                                   rel=1e-4, abs=1e-6)


def test_bad_input(models):
    _, result = patched(models["gpt2"], {**PAIRS, "corrupted": ["the cat on the boat", CORRUPT[1]]})
    assert result.status == "error" and "same number of tokens" in result.reason
    _, result = patched(models["gpt2"], {**PAIRS, "answer": ["the sea"]})
    assert result.status == "error" and "is 2 tokens" in result.reason
    _, result = patched(models["gpt2"], {**PAIRS, "corrupted": CLEAN})
    assert result.status == "error" and "nothing to restore" in result.reason
    _, result = patched(models["gpt2"], {})
    assert result.status == "skipped" and "prompt pairs" in result.reason
    with pytest.raises(BadParameterError, match="in pairs"):
        patched(models["gpt2"], {**PAIRS, "corrupted": CORRUPT[:1]})
