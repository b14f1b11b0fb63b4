"""circuits.logit_lens against a float64 reference written independently (HF hidden states,
one unpadded sequence at a time), and the last entry against the model's own output."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tensorscope_core import analyze, builtin_corpus
from tensorscope_core.testing import check_declared_cost, run_metric

METRIC = "circuits.logit_lens"
TEXTS = [t for t in builtin_corpus()[:6]] + ["the cat", "a dog ran"]  # lengths differ: padded batches


def reference(folder) -> dict[str, list[float]]:
    """Per hidden state l < L: final norm + head on HF's hidden_states[l]; l = L: the logits."""
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").double().eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    body = getattr(model, "transformer", None) or getattr(model, "model", None) or model.gpt_neox
    norm = getattr(body, "ln_f", None) or getattr(body, "norm", None) or body.final_layer_norm
    rows: list[list[float]] = []
    for text in TEXTS:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
            lenses = [model.lm_head(norm(h[0])) for h in out.hidden_states[:-1]] + [out.logits[0]]
        final = torch.log_softmax(out.logits[0], -1)
        for t in range(ids.shape[1] - 1):
            nxt = int(ids[0, t + 1])
            row = []
            for lens in lenses:
                logp = torch.log_softmax(lens[t], -1)
                kl = float(torch.nn.functional.kl_div(logp, final[t], log_target=True, reduction="sum"))
                order = torch.argsort(logp, descending=True, stable=True).tolist()
                row += [kl, float(order[0] == int(final[t].argmax())), order.index(nxt) + 1.0, float(logp[nxt])]
            rows.append(row)
    means = torch.tensor(rows, dtype=torch.float64).mean(0).view(-1, 4)
    return {q: means[:, i].tolist() for i, q in enumerate(
        ("kl", "top1_agreement", "next_token_rank", "next_token_logprob"))}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logit_lens_matches_float64_reference(family, models):
    result = run_metric(METRIC, models[family], TEXTS, dtype="float64")
    want = reference(models[family])
    for field, values in want.items():
        assert result.value(field) == pytest.approx(values, rel=1e-9, abs=1e-12), field
    check_declared_cost(result)


def test_last_entry_is_the_models_output(neox_model):
    """KL 0 and agreement 1 at the entry that leaves the last block (float32 run)."""
    result = run_metric(METRIC, neox_model, TEXTS)
    assert result.value("kl")[-1] == pytest.approx(0.0, abs=1e-6)
    assert result.value("top1_agreement")[-1] == 1.0
    assert result.value("kl")[0] > 1e-3  # the embedding alone predicts something else
    assert len(result.value("kl")) == 3


def test_encoder_is_skipped_with_reason(models):
    result = analyze(models["bert"], metrics=[METRIC]).get(METRIC)
    assert result.status == "skipped" and "causal" in result.reason


def test_a_head_that_is_not_norm_plus_unembed_fails_the_self_check(models):
    model = AutoModelForCausalLM.from_pretrained(models["gpt2"])

    def temperature(module, args, out):  # the model's output is scaled after its unembedding
        out.logits = out.logits * 2
        return out

    model.register_forward_hook(temperature)
    tokenizer = AutoTokenizer.from_pretrained(models["gpt2"])
    result = analyze(model, data=TEXTS, metrics=[METRIC], tokenizer=tokenizer).get(METRIC)
    assert result.status == "error" and "logit lens does not apply" in result.reason
