"""Adapters map each family onto the ModelView vocabulary; the per-head weights are checked
against what the model itself computes (its own projections, attention patterns and
output projection), not only for shape."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from core_helpers import BASIC, FAMILIES, values_of, view_of

from tensorscope_core import GenericAdapter, RunConfig, analyze
from tensorscope_core.errors import UnsupportedModelError
from tensorscope_core.models.load import ModelSource, load_model
from tensorscope_core.models.view import ModelView

pytestmark = pytest.mark.usefixtures("basic_only")

ATOL = 1e-10  # everything below runs in float64


@dataclass
class Captured:
    """What one layer's attention saw and produced during one forward."""

    x: torch.Tensor  # input of the Q/K/V projections (after the attention's input norm)
    q: torch.Tensor  # [b, s, H, dh] the model's own projections, before any rotary
    k: torch.Tensor  # [b, s, Hkv, dh]
    v: torch.Tensor  # [b, s, Hkv, dh]
    z: torch.Tensor  # input of the output projection [b, s, H*dh]
    out: torch.Tensor  # output of the output projection [b, s, d]
    out_bias: torch.Tensor | None
    pattern: torch.Tensor  # [b, H, s, s] from output_attentions


def _parts(view: ModelView, layer: int) -> dict[str, Any]:
    """Per family: how to get the attention input from the block input, and which modules
    project Q/K/V and the output."""
    block = view.blocks[layer]
    if view.family == "gpt2":
        return {"norm": block.ln_1, "qkv": [block.attn.c_attn], "o": block.attn.c_proj}
    if view.family == "llama":
        a = block.self_attn
        return {"norm": block.input_layernorm, "qkv": [a.q_proj, a.k_proj, a.v_proj], "o": a.o_proj}
    if view.family == "gpt_neox":
        return {"norm": block.input_layernorm, "qkv": [block.attention.query_key_value], "o": block.attention.dense}
    if view.family == "bert":  # post-norm: the attention reads the block input itself
        s = block.attention.self
        return {"norm": None, "qkv": [s.query, s.key, s.value], "o": block.attention.output.dense}
    raise AssertionError(view.family)


def capture(view: ModelView, layer: int, ids: torch.Tensor) -> Captured:
    parts = _parts(view, layer)
    seen: dict[str, Any] = {}
    handles = [
        view.blocks[layer].register_forward_pre_hook(
            lambda m, args, kwargs: seen.__setitem__("block_in", args[0] if args else kwargs["hidden_states"]),
            with_kwargs=True),
        parts["o"].register_forward_hook(lambda m, args, out: seen.update(z=args[0], out=out)),
    ]
    for i, module in enumerate(parts["qkv"]):
        handles.append(module.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(f"proj{i}", out)))
    try:
        with torch.no_grad():
            outputs = view.model(input_ids=ids, attention_mask=torch.ones_like(ids), output_attentions=True,
                                 use_cache=False)
    finally:
        for h in handles:
            h.remove()
    block_in = seen["block_in"]
    with torch.no_grad():
        x = parts["norm"](block_in) if parts["norm"] is not None else block_in
    b, s = ids.shape
    H, Hkv, dh, d = view.n_heads, view.n_kv_heads, view.d_head, view.d_model
    if view.family == "gpt2":
        q, k, v = seen["proj0"].split(d, dim=-1)
    elif view.family == "gpt_neox":  # rows interleaved per head: [head, (q|k|v), d_head]
        qkv = seen["proj0"].view(b, s, H, 3, dh)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    else:
        q, k, v = seen["proj0"], seen["proj1"], seen["proj2"]
    return Captured(x=x, q=q.reshape(b, s, H, dh), k=k.reshape(b, s, Hkv, dh), v=v.reshape(b, s, Hkv, dh),
                    z=seen["z"], out=seen["out"], out_bias=getattr(parts["o"], "bias", None),
                    pattern=outputs.attentions[layer])


@pytest.fixture(scope="module")
def views(model_dirs: dict[str, Any], basic_registry: Any) -> dict[str, ModelView]:
    return {f: view_of(model_dirs[f], basic_registry, dtype="float64") for f in FAMILIES}


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(4, 64, (2, 7), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", FAMILIES)
def test_view_dimensions(views: dict[str, ModelView], family: str) -> None:
    view = views[family]
    assert (view.n_layers, view.d_model, view.n_heads, view.d_head) == (2, 32, 4, 8)
    assert view.n_kv_heads == (2 if family == "llama" else 4)
    assert view.rotary == (family in ("llama", "neox"))
    assert view.causal == (family != "bert")
    hw = view.head_weights(0)
    assert hw.W_Q.shape == (4, 32, 8) and hw.W_O.shape == (4, 8, 32)
    assert hw.W_K.shape == hw.W_V.shape == (view.n_kv_heads, 32, 8)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [0, 1])
def test_qkv_weights_reproduce_the_models_projections(views: dict[str, ModelView], ids: torch.Tensor,
                                                      family: str, layer: int) -> None:
    view = views[family]
    hw = view.head_weights(layer)
    cap = capture(view, layer, ids)
    for name, W, bias, got in (("Q", hw.W_Q, hw.b_Q, cap.q), ("K", hw.W_K, hw.b_K, cap.k),
                               ("V", hw.W_V, hw.b_V, cap.v)):
        for h in range(W.shape[0]):
            want = cap.x @ W[h] + (0 if bias is None else bias[h])
            torch.testing.assert_close(want, got[:, :, h], atol=ATOL, rtol=0, msg=f"{family} W_{name}[{h}]")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [0, 1])
def test_value_and_output_weights_rebuild_the_attention_output(views: dict[str, ModelView], ids: torch.Tensor,
                                                               family: str, layer: int) -> None:
    """z_h = A_h @ (x W_V[kv(h)] + b_V), and sum_h z_h W_O[h] = output projection - bias."""
    view = views[family]
    hw = view.head_weights(layer)
    cap = capture(view, layer, ids)
    dh = view.d_head
    total = torch.zeros_like(cap.out)
    for h in range(view.n_heads):
        kv = hw.kv_head_of[h]
        v = cap.x @ hw.W_V[kv] + (0 if hw.b_V is None else hw.b_V[kv])
        z_h = cap.pattern[:, h] @ v
        torch.testing.assert_close(z_h, cap.z[..., h * dh:(h + 1) * dh], atol=ATOL, rtol=0,
                                   msg=f"{family} head {h} reads value head {kv}")
        total += cap.z[..., h * dh:(h + 1) * dh] @ hw.W_O[h]
    want = cap.out - (0 if cap.out_bias is None else cap.out_bias)
    torch.testing.assert_close(total, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_pattern_rebuilt_from_wq_wk(views: dict[str, ModelView], ids: torch.Tensor, family: str) -> None:
    """No rotary: softmax((x W_Q + b_Q)(x W_K + b_K)^T / sqrt(d_head)) with the causal mask
    (GPT-2) or none (BERT, all tokens real) is the model's own attention pattern."""
    view = views[family]
    hw = view.head_weights(0)
    cap = capture(view, 0, ids)
    s = ids.shape[1]
    for h in range(view.n_heads):
        q = cap.x @ hw.W_Q[h] + hw.b_Q[h]
        k = cap.x @ hw.W_K[h] + hw.b_K[h]
        scores = q @ k.transpose(-1, -2) / math.sqrt(view.d_head)
        if view.causal:
            scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(scores.softmax(-1), cap.pattern[:, h], atol=1e-12, rtol=0)


def test_grouped_query_mapping(views: dict[str, ModelView]) -> None:
    view = views["llama"]
    hw = view.head_weights(1)
    assert hw.kv_head_of == view.kv_head_of == (0, 0, 1, 1)
    attn = view.blocks[1].self_attn
    # K head 1 is rows 8..16 of k_proj.weight.
    torch.testing.assert_close(hw.W_K[1], attn.k_proj.weight[8:16].T)
    full = hw.expanded()
    assert full.W_K.shape == full.W_V.shape == (4, 32, 8)
    for h in range(4):
        assert torch.equal(full.W_K[h], hw.W_K[h // 2]) and torch.equal(full.W_V[h], hw.W_V[h // 2])
    for family in ("gpt2", "neox", "bert"):
        assert views[family].head_weights(0).kv_head_of == (0, 1, 2, 3)


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox"])
def test_final_norm_and_unembed_give_the_logits(views: dict[str, ModelView], ids: torch.Tensor,
                                                family: str) -> None:
    """unembed(final_norm(output of the last block)) are the model's logits."""
    view = views[family]
    seen: dict[str, torch.Tensor] = {}
    handle = view.blocks[-1].register_forward_hook(
        lambda m, a, out: seen.__setitem__("last", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            logits = view.model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()
    assert view.final_norm is not None and view.unembed is not None
    with torch.no_grad():
        torch.testing.assert_close(view.unembed(view.final_norm(seen["last"])), logits, atol=ATOL, rtol=0)
    assert view.embed is view.model.get_input_embeddings()


def test_layer_of_parameter_assigns_block_parameters(views: dict[str, ModelView]) -> None:
    view = views["llama"]
    owner = view.layer_of_parameter()
    assert owner["model.layers.1.self_attn.q_proj.weight"] == 1
    assert owner["model.layers.0.mlp.down_proj.weight"] == 0
    assert owner["model.embed_tokens.weight"] is None and owner["model.norm.weight"] is None


def test_plain_module_is_unsupported(basic_registry: Any) -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    with pytest.raises(UnsupportedModelError) as info:
        load_model(ModelSource(model), basic_registry.adapters)
    message = str(info.value)
    assert "Sequential" in message and "GenericAdapter" in message
    # analyze() refuses it the same way, before anything runs
    with pytest.raises(UnsupportedModelError, match="Sequential"):
        analyze(model, data=torch.zeros(2, 4, dtype=torch.long), metrics=["basic.loss"])


def test_transformers_model_without_adapter_is_unsupported(basic_registry: Any) -> None:
    import transformers as tf

    config = tf.BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2)
    model = tf.BloomForCausalLM(config)
    with pytest.raises(UnsupportedModelError) as info:
        load_model(ModelSource(model), basic_registry.adapters)
    message = str(info.value)
    assert "'bloom'" in message and "GenericAdapter" in message
    assert "llama" in message  # lists the adapters that are installed


def _generic_llama() -> GenericAdapter:
    return GenericAdapter(blocks="model.layers", attn="self_attn", mlp_out="mlp.down_proj", n_heads=4,
                          n_kv_heads=2, final_norm="model.norm", rotary=True, max_positions=64)


def test_generic_adapter_on_llama_matches_the_llama_adapter(model_dirs: dict[str, Any], tokens: torch.Tensor,
                                                            basic_registry: Any) -> None:
    folder = model_dirs["llama"]
    view = view_of(folder, basic_registry, adapter=_generic_llama())
    assert view.family == "generic(llama)"
    assert (view.n_layers, view.d_model, view.n_heads, view.n_kv_heads, view.d_mlp) == (2, 32, 4, 2, 64)
    assert view.blocks[1] is view.model.model.layers[1]
    assert view.mlp_out[0] is view.model.model.layers[0].mlp.down_proj
    with pytest.raises(NotImplementedError):
        view.head_weights(0)
    cfg = RunConfig(batch_size=4, max_length=32)
    generic = analyze(str(folder), data=tokens, metrics=list(BASIC), config=cfg, adapter=_generic_llama())
    builtin = analyze(str(folder), data=tokens, metrics=list(BASIC), config=cfg)
    assert generic.model().family == "generic(llama)" and builtin.model().family == "llama"
    for metric in BASIC:
        assert generic.get(metric).ok, generic.get(metric).reason
        assert values_of(generic.get(metric)) == values_of(builtin.get(metric)), metric


def test_generic_adapter_user_guide_example_on_gpt2(model_dirs: dict[str, Any], tokens: torch.Tensor) -> None:
    """The user guide's GenericAdapter example, as written, on GPT-2: its MLP output is a Conv1D (weight
    [in, out]), so d_mlp is the weight's first dimension, 4 d_model (it took the second, d_model, and
    basic.activation_stats ended in error). The values match the built-in GPT-2 adapter's."""
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(model_dirs["gpt2"])
    ids = tokens
    adapter = GenericAdapter(blocks="transformer.h", attn="attn", mlp_out="mlp.c_proj", n_heads=4,
                             final_norm="transformer.ln_f")
    res = analyze(model, data=ids, metrics=["basic.loss", "basic.activation_stats"], adapter=adapter)
    builtin = analyze(model, data=ids, metrics=["basic.loss", "basic.activation_stats"])
    assert res.model().family == "generic(gpt2)"
    for metric in ("basic.loss", "basic.activation_stats"):
        assert res.get(metric).ok, res.get(metric).reason
        assert values_of(res.get(metric)) == values_of(builtin.get(metric)), metric
    view = adapter.build(model, "gpt2")
    assert type(view.mlp_out[0]).__name__ == "Conv1D"
    assert view.d_mlp == 4 * model.config.n_embd == 128


@pytest.mark.parametrize(("family", "adapter", "d_mlp"), [
    ("gpt2", GenericAdapter(blocks="transformer.h", attn="attn", mlp_out="mlp.c_proj", n_heads=4), 128),
    ("llama", _generic_llama(), 64),
], ids=["conv1d", "linear"])
def test_generic_adapter_d_mlp_is_the_mlp_out_input_width(model_dirs: dict[str, Any], basic_registry: Any,
                                                          family: str, adapter: GenericAdapter, d_mlp: int) -> None:
    """d_mlp is the width of mlp_out's input for nn.Linear (weight [out, in]) and Conv1D (weight [in, out])."""
    view = view_of(model_dirs[family], basic_registry, adapter=adapter)
    assert view.d_mlp == d_mlp == view_of(model_dirs[family], basic_registry).d_mlp


def test_generic_adapter_names_a_missing_module(model_dirs: dict[str, Any], basic_registry: Any) -> None:
    bad = GenericAdapter(blocks="model.layers", attn="attention", mlp_out="mlp.down_proj", n_heads=4)
    with pytest.raises(UnsupportedModelError, match="'attention'"):
        view_of(model_dirs["llama"], basic_registry, adapter=bad)
