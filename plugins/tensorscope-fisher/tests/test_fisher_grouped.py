"""fisher.grouped against sums of the diagonal's entries sliced by hand, and the GQA mapping
against a model whose key/value heads are repeated by hand."""

from __future__ import annotations

import pytest
import torch
from fisher_diagonal_reference import load_causal
from tensorscope_fisher.grouped import head_sums

from tensorscope_core import RunConfig, analyze
from tensorscope_core.plugin_api import model_view
from tensorscope_core.testing import check_roundtrip, random_token_data

CONFIG = RunConfig(batch_size=4, max_length=32, dtype="float64")


def _hand_groups(family: str, diag: dict[str, torch.Tensor], layer: int, n_heads: int, n_kv: int, dh: int):
    """(qk [H], ov [H], mlp [d_mlp]) sliced by hand from the parameters' own layouts."""
    d = lambda name: diag[name.format(layer)]  # noqa: E731
    g = n_heads // n_kv
    qk, ov = torch.zeros(n_heads, dtype=torch.float64), torch.zeros(n_heads, dtype=torch.float64)
    for h in range(n_heads):
        q, k = slice(h * dh, (h + 1) * dh), slice((h // g) * dh, (h // g + 1) * dh)
        if family == "gpt2":  # Conv1D c_attn [d, 3d] = [Q | K | V] columns, c_proj [d_in, d_out]
            dm = n_heads * dh
            w, b = d("transformer.h.{}.attn.c_attn.weight"), d("transformer.h.{}.attn.c_attn.bias")
            qk[h] = w[:, q].sum() + b[q].sum() + w[:, dm:][:, q].sum() + b[dm:][q].sum()
            ov[h] = w[:, 2 * dm:][:, q].sum() + b[2 * dm:][q].sum() + d("transformer.h.{}.attn.c_proj.weight")[q].sum()
        else:  # nn.Linear [out, in]; K/V rows of the shared head split equally among its g query heads
            a = "model.layers.{}.self_attn."
            qk[h] = d(a + "q_proj.weight")[q].sum() + d(a + "k_proj.weight")[k].sum() / g
            ov[h] = d(a + "v_proj.weight")[k].sum() / g + d(a + "o_proj.weight")[:, q].sum()
    if family == "gpt2":
        m = "transformer.h.{}.mlp."
        mlp = d(m + "c_fc.weight").sum(0) + d(m + "c_fc.bias") + d(m + "c_proj.weight").sum(1)
    else:
        m = "model.layers.{}.mlp."
        mlp = d(m + "gate_proj.weight").sum(1) + d(m + "up_proj.weight").sum(1) + d(m + "down_proj.weight").sum(0)
    return qk, ov, mlp


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_grouped_equals_sums_of_the_diagonal(family, models, tmp_path):
    model = load_causal(models[family])
    ids = random_token_data(model.config.vocab_size, n=6, length=8, seed=2)
    res = analyze(models[family], data={"x": ids[:4], "y": ids[4:]}, metrics=["fisher.grouped"], config=CONFIG)
    grouped = res.get("fisher.grouped")
    assert grouped.ok, grouped.reason
    cfg = model.config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    dh = cfg.hidden_size // n_heads
    names = [n for n, _ in model.named_parameters()]
    for kind in ("true", "empirical"):
        for seg in ("", "x/", "y/"):
            diag = {n: res.tensor("fisher.diagonal", f"{kind}/{seg}{n}") for n in names}
            for layer in range(cfg.num_hidden_layers):
                qk, ov, mlp = _hand_groups(family, diag, layer, n_heads, n_kv, dh)
                got_qk = torch.tensor(grouped.value(f"{kind}/{seg}head_qk")[layer], dtype=torch.float64)
                got_ov = torch.tensor(grouped.value(f"{kind}/{seg}head_ov")[layer], dtype=torch.float64)
                got_head = torch.tensor(grouped.value(f"{kind}/{seg}head")[layer], dtype=torch.float64)
                torch.testing.assert_close(got_qk, qk, rtol=1e-13, atol=0)
                torch.testing.assert_close(got_ov, ov, rtol=1e-13, atol=0)
                torch.testing.assert_close(got_head, qk + ov, rtol=1e-13, atol=0)
                torch.testing.assert_close(res.tensor("fisher.grouped", f"{kind}/{seg}mlp_unit")[layer], mlp,
                                           rtol=1e-13, atol=0)
                prefix = f"transformer.h.{layer}." if family == "gpt2" else f"model.layers.{layer}."
                block = sum(float(diag[n].sum()) for n in names if n.startswith(prefix))
                assert grouped.value(f"{kind}/{seg}block")[layer] == pytest.approx(block, rel=1e-13)
            outside = sum(float(diag[n].sum()) for n in names if ".h." not in n and ".layers." not in n)
            assert grouped.value(f"{kind}/{seg}outside") == pytest.approx(outside, rel=1e-13)
            total = sum(grouped.value(f"{kind}/{seg}block")) + grouped.value(f"{kind}/{seg}outside")
            trace = res.get("fisher.diagonal").value(f"{kind}_trace" + (f"/{seg[:-1]}" if seg else ""))
            assert total == pytest.approx(trace, rel=1e-12)
    p = sum(t.numel() for t in model.parameters())
    assert grouped.value("n_entries") == p
    assert grouped.values["true/block"].axis == "block" and len(grouped.value("true/block")) == cfg.num_hidden_layers
    assert grouped.value("memory_reduction") == pytest.approx(p / grouped.value("n_grouped"))
    check_roundtrip(res, tmp_path / "out")


def test_gqa_heads_match_a_model_with_kv_repeated_by_hand(models):
    """LLaMA with 4 query and 2 key/value heads against the same function written with 4 key/value
    heads (k_proj, v_proj rows repeated per query head): both compute identical logits; with the
    K/V diagonal of the repeated model set to the shared head's value / g, the per-head groups agree."""
    gqa = load_causal(models["llama"])
    cfg = gqa.config
    mha_cfg = type(cfg).from_dict({**cfg.to_dict(), "num_key_value_heads": cfg.num_attention_heads})
    mha = type(gqa)(mha_cfg).double().eval()
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    dh = cfg.hidden_size // cfg.num_attention_heads
    state = gqa.state_dict()

    def repeat(t: torch.Tensor) -> torch.Tensor:  # rows [n_kv * dh, d] -> [n_heads * dh, d], head h reads h // g
        return t.reshape(cfg.num_key_value_heads, dh, -1).repeat_interleave(g, dim=0).reshape(-1, t.shape[1])

    expanded = {n: repeat(t) if n.endswith(("k_proj.weight", "v_proj.weight")) else t for n, t in state.items()}
    mha.load_state_dict(expanded)
    ids = random_token_data(cfg.vocab_size, n=2, length=6, seed=1)
    with torch.no_grad():  # (float32 rotary tables: equal to ~1e-8; a wrong repeat differs by O(1))
        torch.testing.assert_close(mha(ids).logits, gqa(ids).logits, rtol=0, atol=1e-6)
    with model_view(gqa) as view_gqa, model_view(mha) as view_mha:  # the installed adapters' views
        gen = torch.Generator().manual_seed(0)
        diag = {n: torch.rand(p.shape, generator=gen, dtype=torch.float64)
                for n, p in view_gqa.model.named_parameters()}
        diag_mha = {n: repeat(t) / g if n.endswith(("k_proj.weight", "v_proj.weight")) else t
                    for n, t in diag.items()}
        for layer in range(cfg.num_hidden_layers):
            qk, ov = head_sums(view_gqa, layer, diag)
            qk_mha, ov_mha = head_sums(view_mha, layer, diag_mha)
            torch.testing.assert_close(qk, qk_mha, rtol=1e-13, atol=0)
            torch.testing.assert_close(ov, ov_mha, rtol=1e-13, atol=0)
            # the heads partition the projections: the K/V totals are counted exactly once
            a = f"model.layers.{layer}.self_attn."
            total = sum(float(diag[a + p].sum()) for p in ("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                           "o_proj.weight"))
            assert float((qk + ov).sum()) == pytest.approx(total, rel=1e-13)


def test_generic_adapter_without_heads_is_skipped(models):
    from tensorscope_core import GenericAdapter

    adapter = GenericAdapter(blocks="transformer.h", attn="attn", mlp_out="mlp.c_proj", n_heads=4,
                             final_norm="transformer.ln_f")
    res = analyze(models["gpt2"], data=random_token_data(64, n=2, length=6), metrics=["fisher.grouped"],
                  adapter=adapter, config=CONFIG)
    result = res.get("fisher.grouped")
    assert result.status == "skipped" and "per-head weights" in result.reason


def test_fused_gate_up_projection_is_split_per_unit(tmp_path):
    """Phi-3 fuses gate and up into one [2 d_mlp, d] projection (gate rows first): MLP unit j sums
    rows j and d_mlp + j of it and column j of the projection out."""
    from tensorscope_core.testing import tiny_model

    folder = tiny_model("phi3", tmp_path / "phi3")
    res = analyze(folder, data=random_token_data(64, n=4, length=8, seed=3), metrics=["fisher.grouped"],
                  config=CONFIG)
    assert res.get("fisher.grouped").ok, res.get("fisher.grouped").reason
    for layer in range(2):
        fused = res.tensor("fisher.diagonal", f"true/model.layers.{layer}.mlp.gate_up_proj.weight")
        down = res.tensor("fisher.diagonal", f"true/model.layers.{layer}.mlp.down_proj.weight")
        d_mlp = down.shape[1]
        want = fused[:d_mlp].sum(1) + fused[d_mlp:].sum(1) + down.sum(0)
        torch.testing.assert_close(res.tensor("fisher.grouped", "true/mlp_unit")[layer], want, rtol=1e-13, atol=0)
