"""circuits.attention_attribution: a hand-built model worked out by hand, a float64 autograd reference,
the first-order Taylor identity, the shared pass it rides on, and its cost."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from tensorscope_core import RunConfig, analyze
from tensorscope_core.plugin_api import ModelView, model_view
from tensorscope_core.testing import (
    check_declared_cost,
    check_declared_passes,
    check_roundtrip,
    run_metric,
    temporary_plugin,
    tiny_model,
)

METRIC = "circuits.attention_attribution"
TEXTS = ["the cat sat on the mat", "a dog", "the bird flew over the old house today", "one two three four"]
F64 = RunConfig(batch_size=3, dtype="float64")


class ToyAttention(nn.Module):
    """Causal multi-head attention without biases; returns (output, probabilities) as HF modules do,
    or (output, None) with ``return_probs`` off, as a fused kernel does."""

    return_probs = True

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.dh = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        split = [f(x).view(b, t, self.heads, self.dh).transpose(1, 2) for f in (self.q, self.k, self.v)]
        scores = split[0] @ split[1].transpose(-1, -2) / self.dh ** 0.5
        allowed = torch.ones(t, t, dtype=torch.bool).tril() & mask.bool()[:, None, None, :]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        z = (probs @ split[2]).transpose(1, 2).reshape(b, t, -1)
        return self.o(z), probs if self.return_probs else None


class ToyLM(nn.Module):
    """logits = (E[x] + attention(E[x])) U: one attention layer, no norm, no MLP."""

    def __init__(self, vocab: int = 8, d: int = 4, heads: int = 2) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.mix = ToyAttention(d, heads)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                use_cache: bool = False, output_attentions: bool = False) -> SimpleNamespace:
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        x = self.tok(input_ids)
        out, probs = self.mix(x, mask)
        return SimpleNamespace(logits=self.head(x + out), attentions=(probs,) if output_attentions else None)


class ToyAdapter:
    name = "toylm"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, ToyLM)

    def build(self, model: ToyLM, name: str, tokenizer: object = None) -> ModelView:
        d, heads = model.tok.embedding_dim, model.mix.heads
        return ModelView(model=model, name=name, family="toylm", n_layers=1, d_model=d, n_heads=heads,
                         n_kv_heads=heads, d_head=d // heads, d_mlp=d, vocab_size=model.tok.num_embeddings,
                         max_positions=None, causal=True, rotary=False, embed=model.tok, blocks=[model.mix],
                         attn=[model.mix], mlp_out=[model.head], attn_out=[model.mix.o], final_norm=None,
                         unembed=model.head, tokenizer=tokenizer)


def toy_model() -> ToyLM:
    """Head 0 attends uniformly (W_Q = 0: A[q, k] = 1 / (q + 1)); head 1's output projection is 0, so the
    loss does not depend on its attention at all. The logits are linear in head 0's attention."""
    torch.manual_seed(3)
    model = ToyLM().double().eval()
    with torch.no_grad():
        model.mix.q.weight[:2].zero_()  # head 0's query dims
        model.mix.o.weight[:, 2:].zero_()  # head 1's columns of W_O
    return model


def toy_by_hand(model: ToyLM, ids: np.ndarray) -> np.ndarray:
    """[heads] attribution worked out in numpy: A0 = 1/(q+1), and dL/dA0[q, k] = c[q, k] =
    (p_q - e_{y_q}) U W_O0 v_k / N, the closed-form gradient of the mean cross-entropy of logits that
    are linear in A0 (head 1: 0)."""
    e, u = model.tok.weight.detach().numpy(), model.head.weight.detach().numpy()  # [V, d], [V, d]
    w_v0, w_o0 = model.mix.v.weight.detach().numpy()[:2], model.mix.o.weight.detach().numpy()[:, :2]  # [2, d], [d, 2]
    total, n = 0.0, 0
    for row in ids:
        t = len(row)
        x = e[row]  # [t, d]
        v = x @ w_v0.T  # [t, 2]
        a0 = np.tril(np.ones((t, t))) / np.arange(1, t + 1)[:, None]
        logits = (x + (a0 @ v) @ w_o0.T) @ u.T  # [t, V]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        r = p[:-1].copy()
        r[np.arange(t - 1), row[1:]] -= 1.0  # p_q - e_{y_q}, for the t - 1 targets
        c = (r @ u @ w_o0) @ v.T  # [t - 1, t]: c[q, k] before dividing by N
        total += float((a0[:-1] * c).sum())
        n += t - 1
    return np.array([total / n, 0.0])


def test_hand_built_model_against_closed_form():
    """Known answer: attribution = sum A0 * c with A0 and c by hand in float64 (unpadded rows of two lengths)."""
    model = toy_model()
    rows = [np.array([1, 5, 2, 7, 3]), np.array([4, 4, 6, 1, 2]), np.array([6, 2, 5])]
    data = [torch.tensor(r) for r in rows]
    with temporary_plugin("toy", adapters=[ToyAdapter()]) as registry:
        res = analyze(model, data=data, metrics=[METRIC], config=RunConfig(batch_size=2, dtype="float64"),
                      registry=registry)
    result = res.get(METRIC)
    assert result.ok, result.reason
    expected = toy_by_hand(model, rows)
    got = np.array(result.value("attribution")[0])
    assert abs(expected[0]) > 1e-3
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    assert result.value("rank")[0] == [1.0, 2.0]
    assert result.value("share")[0] == pytest.approx([1.0, 0.0], abs=1e-15)
    assert result.value("total") == pytest.approx(expected[0], rel=1e-12)


def test_attention_without_probabilities_fails_only_this_metric():
    """A module that returns no probabilities (a fused kernel): this metric ends in error with the fix, the
    other metrics of the same pass are unaffected."""
    model = toy_model()
    model.mix.return_probs = False
    data = [torch.tensor([1, 5, 2, 7, 3]), torch.tensor([4, 4, 6, 1, 2])]
    with temporary_plugin("toy", adapters=[ToyAdapter()]) as registry:
        res = analyze(model, data=data, metrics=[METRIC, "basic.grad_norms"], registry=registry)
    result = res.get(METRIC)
    assert result.status == "error" and "attn_implementation='eager'" in result.reason
    assert res.get("basic.grad_norms").ok


def hf_model(folder, family: str) -> nn.Module:
    auto = AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM
    return auto.from_pretrained(folder, attn_implementation="eager").double().eval()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_matches_float64_autograd_reference(family, models):
    """Independent reference: each text alone (no padding), float64, torch.autograd.grad of the summed
    token loss w.r.t. Hugging Face's returned attentions; per query head (LLaMA: 4 query heads read
    2 key/value heads). The metric runs in float32 on padded batches."""
    result = run_metric(METRIC, models[family], TEXTS, batch_size=3)
    model, tokenizer = hf_model(models[family], family), AutoTokenizer.from_pretrained(models[family])
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    signed = torch.zeros(layers, heads, dtype=torch.float64)
    absolute, n = torch.zeros_like(signed), 0
    for text in TEXTS:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        out = model(ids, output_attentions=True, use_cache=False)
        loss = nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:], reduction="sum")
        for layer, (a, g) in enumerate(zip(out.attentions, torch.autograd.grad(loss, out.attentions), strict=True)):
            product = a.detach() * g
            signed[layer] += product.sum(dim=(0, 2, 3))
            absolute[layer] += product.abs().sum(dim=(0, 2, 3))
        n += ids.shape[1] - 1
    assert torch.tensor(result.value("attribution")).shape == (layers, heads)
    np.testing.assert_allclose(result.value("attribution"), (signed / n).numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(result.value("abs_attribution"), (absolute / n).numpy(), rtol=1e-4, atol=1e-7)
    check_declared_cost(result)


@pytest.mark.parametrize("family,rtol", [("gpt2", 1e-8), ("llama", 1e-4), ("bert", 1e-8)])
def test_total_is_first_order_change_of_the_loss(family, rtol, models):
    """Taylor: sum over heads = -dL/d eps of L((1 - eps) A), the run's own loss (basic.loss, the masked LM's
    seeded masks for BERT). Scaling A scales the heads' outputs, so the test scales the input of each
    attention output projection; five-point stencil at h = 1e-2, float64. LLaMA's softmax runs in float32
    (Hugging Face casts it), which leaves ~1e-8 noise in the loss, hence its looser tolerance."""
    model = hf_model(models[family], family)
    tokenizer = AutoTokenizer.from_pretrained(models[family])
    total = analyze(model, data=TEXTS, metrics=[METRIC], config=F64, tokenizer=tokenizer).get(METRIC).value("total")
    with model_view(model) as view:
        projections = list(view.attn_out)

    def loss_at(eps: float) -> float:
        handles = [m.register_forward_pre_hook(lambda m, args: (args[0] * (1 - eps), *args[1:]))
                   for m in projections]
        try:
            res = analyze(model, data=TEXTS, metrics=["basic.loss"], config=F64, tokenizer=tokenizer)
        finally:
            for h in handles:
                h.remove()
        return res.get("basic.loss").value("loss")

    h = 1e-2
    derivative = (8 * (loss_at(h) - loss_at(-h)) - (loss_at(2 * h) - loss_at(-2 * h))) / (12 * h)
    assert total == pytest.approx(-derivative, rel=rtol)


def test_rides_on_the_shared_backward(models, tmp_path):
    """No pass of its own: one forward and one backward per batch, shared with basic.grad_norms."""
    res = analyze(models["llama"], data=TEXTS, metrics=[METRIC, "basic.grad_norms"], config=RunConfig(batch_size=3))
    result = res.get(METRIC)
    assert result.passes_declared == {} and result.model_calls == 0
    check_declared_passes(result)
    assert res.record.models[0].passes == {"forward": 2, "backward": 2}
    assert sorted(r[:2] for r in result.values["top"].rows) == [[layer, head] for layer in range(2)
                                                               for head in range(4)]
    check_roundtrip(res, tmp_path / "out")


def test_batching_does_not_change_values(models):
    one = run_metric(METRIC, models["gpt2"], TEXTS, batch_size=1, dtype="float64")
    four = run_metric(METRIC, models["gpt2"], TEXTS, batch_size=4, dtype="float64")
    np.testing.assert_allclose(one.value("attribution"), four.value("attribution"), rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("family,length,why", [("bert", 8, "mask token"), ("gpt2", 1, "one token long")])
def test_no_loss_targets_is_skipped(family, length, why, tmp_path):
    """No loss targets (a BERT without a mask token; one-token sequences): no gradient, skipped with the reason."""
    folder = tiny_model(family, tmp_path / family, with_tokenizer=False)
    result = analyze(folder, data=torch.randint(4, 64, (4, length)), metrics=[METRIC]).get(METRIC)
    assert result.status == "skipped" and why in result.reason
