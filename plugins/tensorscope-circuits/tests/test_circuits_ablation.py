"""circuits.ablation against hand computations in float64 on edited copies of the model:
zero-ablating head h = zeroing its rows of W_O; mean-ablating it = zeroing them and adding
mean(z_h) W_O[h] to the projection's bias; the same for an MLP's output projection."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tensorscope_core import RunConfig, analyze
from tensorscope_core.testing import check_declared_cost, run_metric, tiny_model

METRIC = "circuits.ablation"
TEXTS = ["the cat sat on the mat", "a dog ran", "the bird flew over the old house today", "one two three four"]
D_HEAD = 8


def projections(model, family, layer):
    """(attention output projection, MLP output projection, weight layout) of one block, by hand."""
    if family == "gpt2":  # Conv1D: weight [in, out]
        block = model.transformer.h[layer]
        return block.attn.c_proj, block.mlp.c_proj, "in_out"
    if family == "opt":  # its MLP runs on the tokens flattened to [batch * seq, d]
        block = model.model.decoder.layers[layer]
        return block.self_attn.out_proj, block.fc2, "out_in"
    block = model.model.layers[layer]
    return block.self_attn.o_proj, block.mlp.down_proj, "out_in"


def mean_input(model, module, ids_list):
    """Mean over all real tokens of the input of ``module`` (one unpadded sequence at a time)."""
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for ids in ids_list:
            model(ids)
    handle.remove()
    return torch.cat(seen).mean(0)


def loss_per_token(model, ids_list):
    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids in ids_list:
            logits = model(ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            tokens += ids.shape[1] - 1
    return total / tokens


def hand_delta(folder, family, kind, layer, head, mode):
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").double().eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids_list = [torch.tensor([tokenizer(t)["input_ids"]]) for t in TEXTS]
    clean = loss_per_token(model, ids_list)
    edited = copy.deepcopy(model)
    attn_out, mlp_out, layout = projections(edited, family, layer)
    module = attn_out if kind == "head" else mlp_out
    with torch.no_grad():
        if kind == "head":
            rows = slice(head * D_HEAD, (head + 1) * D_HEAD)
            weight = module.weight if layout == "in_out" else module.weight.T  # [in, out] view
            if mode == "mean":
                mu = mean_input(model, projections(model, family, layer)[0], ids_list)[rows]
                shift = mu @ weight[rows]
                if module.bias is None:
                    module.bias = torch.nn.Parameter(torch.zeros_like(shift))
                module.bias += shift
            weight[rows] = 0
        else:
            if mode == "mean":
                mu_in = mean_input(model, projections(model, family, layer)[1], ids_list)
                out = module(mu_in)  # the MLP's mean output = projection of its mean hidden units (linear)
                module.bias = torch.nn.Parameter(out.clone())
            else:
                module.bias = None if module.bias is None else torch.nn.Parameter(torch.zeros_like(module.bias))
            module.weight.zero_()
    return loss_per_token(edited, ids_list) - clean


@pytest.fixture(scope="module")
def results(models, tmp_path_factory):
    config = RunConfig(batch_size=2, dtype="float64")  # two padded batches
    folders = {**models, "opt": tiny_model("opt", tmp_path_factory.mktemp("ablation-opt") / "opt")}
    return {family: (folders[family], analyze(folders[family], data=TEXTS, metrics=[METRIC], config=config).get(METRIC))
            for family in ("gpt2", "llama", "opt")}


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_head_ablation_equals_editing_w_o(results, family, mode):
    folder, result = results[family]
    assert result.ok, result.reason
    for layer, head in ((0, 1), (1, 3)):
        want = hand_delta(folder, family, "head", layer, head, mode)
        assert abs(want) > 1e-6  # the head matters, so equality is informative
        assert result.value(f"head_{mode}")[layer][head] == pytest.approx(want, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt"])
@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_mlp_ablation_equals_editing_the_output_projection(results, family, mode):
    folder, result = results[family]
    want = hand_delta(folder, family, "mlp", 1, None, mode)
    assert abs(want) > 1e-6
    assert result.value(f"mlp_{mode}")[1] == pytest.approx(want, rel=1e-6, abs=1e-9)


def test_table_cis_and_cost(results):
    result = results["gpt2"][1]
    rows = result.values["table"].rows
    assert len(rows) == 2 * (2 * 4 + 2)  # modes x (heads + MLPs)
    for kind, layer, head, mode, delta, low, high in rows:
        grid = result.value(f"{kind}_{mode}")
        assert delta == (grid[layer][head] if kind == "head" else grid[layer])
        assert low <= high
    assert result.value("clean_loss") > 0
    check_declared_cost(result)


def test_encoder_and_neox_run(models, neox_model):
    """BERT: the masked-LM loss; GPT-NeoX: its fused attention. Zeroing an MLP matters somewhere."""
    for folder in (models["bert"], neox_model):
        result = run_metric(METRIC, folder, TEXTS, params={"modes": ["zero"]})
        assert any(abs(v) > 0 for v in result.value("mlp_zero"))
        assert set(result.values) == {"head_zero", "mlp_zero", "clean_loss", "table"}


def test_nothing_to_ablate_is_skipped(models):
    res = analyze(models["gpt2"], data=TEXTS, metrics=[METRIC], params={METRIC: {"heads": False, "mlps": False}})
    assert res.get(METRIC).status == "skipped" and "nothing to ablate" in res.get(METRIC).reason
