"""dynamics.signal_propagation: chi 1 and (1 + alpha)^2 and singular values 1 on hand-built
blocks, rank collapse on identical tokens, and the jvp estimates against Jacobians of the full
model (so the causal mask the block gets is the model's own)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from tensorscope_core import GenericAdapter, RunConfig, analyze
from tensorscope_core.testing import check_declared_cost, check_declared_passes, random_token_data

IDS = random_token_data(64, n=4, length=8, seed=2)


class LinearBlock(nn.Module):
    """h -> h + alpha h, or h -> Q h for an orthogonal Q (an MLP slot so the adapter maps it)."""

    def __init__(self, d: int, alpha: float | None = None, orthogonal: torch.Tensor | None = None) -> None:
        super().__init__()
        self.alpha, self.orthogonal = alpha, orthogonal
        self.attn = nn.Identity()
        self.mlp = nn.Linear(d, d)

    def forward(self, h: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
        return h @ self.orthogonal if self.orthogonal is not None else h + self.alpha * h


class Toy(nn.Module):
    def __init__(self, blocks: list[nn.Module], d: int = 16, vocab: int = 64) -> None:
        super().__init__()
        self.embed, self.layers, self.head = nn.Embedding(vocab, d), nn.ModuleList(blocks), nn.Linear(d, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None, use_cache: Any = None, **_: Any) -> Any:
        h = self.embed(input_ids)
        for block in self.layers:
            h = block(h, attention_mask=attention_mask)
        return SimpleNamespace(logits=self.head(h))


ADAPTER = GenericAdapter(blocks="layers", attn="attn", mlp_out="mlp", n_heads=1, embed="embed", unembed="head")


def _run(model: Any, adapter: Any = None, **params: Any) -> Any:
    res = analyze(
        model,
        data=IDS,
        metrics=["dynamics.signal_propagation"],
        adapter=adapter,
        params={"dynamics.signal_propagation": {"n_probes": 4, "sv_tokens": 2, **params}},
        config=RunConfig(batch_size=2),
    )
    result = res.get("dynamics.signal_propagation")
    assert result.ok, result.reason
    check_declared_passes(result)
    check_declared_cost(result)
    return result


def test_chi_of_hand_built_blocks():
    """Spec: block h + 0 -> chi 1; h + alpha h -> (1 + alpha)^2; an orthogonal map -> every singular value 1."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    model = Toy([LinearBlock(16, alpha=0.0), LinearBlock(16, alpha=0.5), LinearBlock(16, orthogonal=q)])
    result = _run(model, ADAPTER)
    assert result.value("chi") == pytest.approx([1.0, 2.25, 1.0], rel=1e-6)
    assert result.value("sv_max") == pytest.approx([1.0, 1.5, 1.0], rel=1e-6)
    assert result.value("sv_min") == pytest.approx([1.0, 1.5, 1.0], rel=1e-6)
    assert result.value("sv_log_sd") == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)


def test_identical_tokens_have_cosine_one_and_no_residual(models):
    """Spec: identical tokens -> cosine 1, residual 0. A LLaMA has no absolute positions, so a
    repeated token stays one vector at every layer (attention averages identical values)."""
    ids = torch.full((2, 8), 7)
    res = analyze(
        models["llama"],
        data=ids,
        metrics=["dynamics.signal_propagation"],
        params={"dynamics.signal_propagation": {"n_probes": 1, "sv_tokens": 0}},
    )
    result = res.get("dynamics.signal_propagation")
    assert result.value("cosine") == pytest.approx([1.0] * 3, abs=1e-6)
    assert result.value("residual") == pytest.approx([0.0] * 3, abs=1e-5)
    assert "sv_tokens" in result.value("note").text


def _full_model_jacobian(model: Any, blocks: Any, layer: int, ids: torch.Tensor) -> torch.Tensor:
    """d (output of block ``layer``) / d (its input) through the whole model: the input is
    replaced by x at a pre-hook and the output read at a hook, on the model's own call."""
    captured: dict[str, torch.Tensor] = {}

    def pre(_m: Any, args: Any) -> Any:
        return (captured["x"], *args[1:])

    def post(_m: Any, _a: Any, out: Any) -> None:
        captured["y"] = out[0] if isinstance(out, tuple) else out

    with torch.no_grad():
        grab = blocks[layer].register_forward_pre_hook(lambda m, a: captured.__setitem__("x0", a[0]))
        model(ids)
        grab.remove()

    def f(x: torch.Tensor) -> torch.Tensor:
        captured["x"] = x
        model(ids)
        return captured["y"]

    handles = [blocks[layer].register_forward_pre_hook(pre), blocks[layer].register_forward_hook(post)]
    try:
        jac = torch.autograd.functional.jacobian(f, captured["x0"].double().float())
    finally:
        for h in handles:
            h.remove()
    return jac.double()  # [1, T, d, 1, T, d]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_against_the_full_models_jacobian(models, family):
    """chi (many probes) and the token-local singular values equal the Jacobian of the block's
    output with respect to its input computed through the whole model (causal mask included)."""
    ids = IDS[:1]
    res = analyze(
        models[family],
        data=ids,
        metrics=["dynamics.signal_propagation"],
        params={"dynamics.signal_propagation": {"n_probes": 64, "sv_tokens": 2}},
    )
    result = res.get("dynamics.signal_propagation")
    model = AutoModelForCausalLM.from_pretrained(models[family], attn_implementation="eager").eval()
    blocks = model.transformer.h if family == "gpt2" else model.model.layers
    for layer in range(2):
        jac = _full_model_jacobian(model, blocks, layer, ids)[0, 1:, :, 0, 1:, :]  # positions >= 1
        dim = jac.shape[0] * jac.shape[1]
        assert result.value("chi")[layer] == pytest.approx(float(jac.square().sum()) / dim, rel=0.05)
        local = [torch.linalg.svdvals(jac[t, :, t, :]) for t in (0, 1)]  # positions 1 and 2
        assert result.value("sv_max")[layer] == pytest.approx(float(sum(s.max() for s in local) / 2), rel=1e-4)
        assert result.value("sv_min")[layer] == pytest.approx(float(sum(s.min() for s in local) / 2), rel=1e-3)


def test_single_tokens_are_skipped_and_bad_parameters_refused(models):
    from tensorscope_core.plugin_api import BadParameterError

    res = analyze(models["gpt2"], data=torch.full((2, 1), 5), metrics=["dynamics.signal_propagation"])
    result = res.get("dynamics.signal_propagation")
    assert result.status == "skipped" and "single token" in result.reason
    with pytest.raises(BadParameterError):
        analyze(
            models["gpt2"],
            data=IDS,
            metrics=["dynamics.signal_propagation"],
            params={"dynamics.signal_propagation": {"n_probes": 0}},
        )
