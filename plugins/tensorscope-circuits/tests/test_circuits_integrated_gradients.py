"""circuits.integrated_gradients: exact on a linear model (closed form), equal to an independent
float64 Riemann sum (one unpadded sequence at a time, through ``inputs_embeds``), complete
within the documented tolerance, and independent of the chunking."""

from __future__ import annotations

import pytest
import torch
from circuits_toy_reference import ToyLM, toy_adapter
from tensorscope_circuits.ig import integrated_gradients, mean_token_loss, quadrature
from transformers import AutoModelForCausalLM, AutoTokenizer

from tensorscope_core import ModelSource, RunConfig, analyze
from tensorscope_core.models.load import load_model  # core internal: no public loader of a ModelView
from tensorscope_core.plugin_api import hook_free_view
from tensorscope_core.plugins import get_registry  # core internal: the installed adapters, for load_model
from tensorscope_core.testing import check_declared_cost, run_at_rung, run_metric

METRIC = "circuits.integrated_gradients"
TEXTS = ["the cat sat on the mat", "a dog ran", "the bird flew over the old house today", "one two three four"]
F64 = RunConfig(batch_size=2, dtype="float64")


def run(model, data, params, **kw):
    res = analyze(model, data=data, metrics=[METRIC], params={METRIC: params}, config=F64, **kw)
    result = res.get(METRIC)
    assert result.ok, result.reason
    return res, result


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_left", "riemann_middle", "riemann_trapezoid"])
@pytest.mark.parametrize("baseline", ["zero", "pad"])
def test_linear_model_gives_the_closed_form(rule, baseline):
    """F = u_k . (e_{T-1} + mean_s e_s): IG_s = (e_s - e'_s) . u_k (1/T + [s = T-1]) for every rule."""
    model = ToyLM()
    ids = torch.tensor([[3, 5, 7, 9, 11], [2, 4, 6, 8, 10]])
    res, result = run(model, ids, {"target": "logit", "token": 6, "steps": 3, "rule": rule, "baseline": baseline},
                      adapter=toy_adapter())
    with torch.no_grad():
        e = model.tok.weight.double()[ids]
        e0 = model.tok.weight.double()[0] if baseline == "pad" else torch.zeros(8, dtype=torch.float64)
        u = model.head.weight.double()[6]
    t = ids.shape[1]
    scale = torch.full((t,), 1 / t, dtype=torch.float64)
    scale[-1] += 1
    want = ((e - e0) @ u) * scale
    torch.testing.assert_close(res.tensor(METRIC, "attributions"), want, rtol=1e-12, atol=1e-14)
    assert result.value("completeness_error") < 1e-12


def riemann_reference(folder, text, steps, target) -> tuple[torch.Tensor, float, float]:
    """Middle Riemann sum, node by node, with autograd through inputs_embeds (zero baseline), float64."""
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").double().eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(folder)(text)["input_ids"]])
    x = model.get_input_embeddings()(ids).detach()

    def F(embeds):
        logits = model(inputs_embeds=embeds).logits[0]
        if target == "loss":
            return torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
        return logits[-1, 7]

    total = torch.zeros_like(x)
    for k in range(steps):
        point = ((k + 0.5) / steps * x).requires_grad_(True)
        (g,) = torch.autograd.grad(F(point), point)
        total += g / steps
    with torch.no_grad():
        return (x * total).sum(-1)[0], float(F(x)), float(F(torch.zeros_like(x)))


@pytest.mark.parametrize(("family", "target"), [("gpt2", "loss"), ("llama", "logit")])
def test_equals_independent_float64_riemann_sum(family, target, models):
    steps = 16
    params = {"target": target, "token": 7, "steps": steps, "rule": "riemann_middle", "chunk": 5}
    res, result = run(models[family], TEXTS, params)
    got = res.tensor(METRIC, "attributions")
    rtol = 1e-8 if family == "gpt2" else 1e-5  # LLaMA's rotary tables are float32 in any dtype (and shape-dependent)
    for i, text in enumerate(TEXTS):
        want, at_input, at_baseline = riemann_reference(models[family], text, steps, target)
        n = len(want)
        torch.testing.assert_close(got[i, :n], want, rtol=rtol, atol=1e-10)
        assert got[i, n:].isnan().all()
        assert res.tensor(METRIC, "at_input")[i].item() == pytest.approx(at_input, rel=rtol)
        assert res.tensor(METRIC, "at_baseline")[i].item() == pytest.approx(at_baseline, rel=rtol)
    check_declared_cost(result)


def test_completeness_within_documented_tolerance(models):
    """The docstring's figures: GPT-2, 50 Gauss-Legendre steps: relative error below 1e-3; LLaMA
    from the zero embedding (the path starts where RMSNorm is singular): below 1e-2 at 200 steps."""
    _, result = run(models["gpt2"], TEXTS, {})
    assert result.value("completeness_relative") < 1e-3
    _, coarse = run(models["gpt2"], TEXTS, {"steps": 2, "rule": "riemann_left"})
    assert coarse.value("completeness_error") > 10 * result.value("completeness_error")  # the error is real
    _, llama_50 = run(models["llama"], TEXTS, {})
    _, llama_200 = run(models["llama"], TEXTS, {"steps": 200, "chunk": 50})
    assert llama_200.value("completeness_relative") < 1e-2
    assert llama_200.value("completeness_error") < llama_50.value("completeness_error") / 10


def test_chunking_does_not_change_the_values(models):
    one, _ = run(models["gpt2"], TEXTS, {"steps": 7, "chunk": 1})
    all_at_once, _ = run(models["gpt2"], TEXTS, {"steps": 7, "chunk": 7})
    torch.testing.assert_close(one.tensor(METRIC, "attributions"), all_at_once.tensor(METRIC, "attributions"),
                               rtol=1e-12, atol=1e-14, equal_nan=True)


def test_encoder_and_neox(models, neox_model):
    """Masked-LM loss from the mask-token baseline on BERT; the top prediction's logit on GPT-NeoX."""
    result = run_metric(METRIC, models["bert"], TEXTS, params={"baseline": "mask", "steps": 64})
    assert result.value("completeness_relative") < 1e-2
    result = run_metric(METRIC, neox_model, TEXTS, params={"target": "logit", "steps": 64})
    assert result.value("completeness_relative") < 1e-2


def test_quadrature_rules_integrate_what_they_should():
    nodes, weights = quadrature("gausslegendre", 3)  # exact up to degree 5
    assert float((weights * nodes ** 5).sum()) == pytest.approx(1 / 6, abs=1e-15)
    nodes, weights = quadrature("riemann_trapezoid", 5)
    assert float(weights.sum()) == pytest.approx(1.0) and float((weights * nodes).sum()) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least 2"):
        quadrature("riemann_trapezoid", 1)


def test_mask_baseline_without_mask_token_is_skipped(models):
    res = analyze(models["gpt2"], data=TEXTS, metrics=[METRIC], params={METRIC: {"baseline": "mask"}})
    assert res.get(METRIC).status == "skipped" and "mask token" in res.get(METRIC).reason


def test_the_path_runs_on_a_hook_free_twin_with_the_same_weights(models):
    """The metric's own forwards run inside the shared pass: on the twin the capture hooks never fire."""
    view = load_model(ModelSource(models["gpt2"]), get_registry().adapters)
    fired = []
    view.blocks[0].register_forward_hook(lambda *args: fired.append(1))
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    targets, mask = torch.zeros_like(ids), torch.ones_like(ids)
    targets[:, :-1], mask[:, -1] = ids[:, 1:], 0
    twin = hook_free_view(view)
    assert twin.model is not view.model and twin.embed.weight is view.embed.weight
    baseline = torch.zeros(2, 4, view.d_model)
    kw = {"steps": 4, "rule": "gausslegendre", "chunk": 2}
    on_twin = integrated_gradients(twin, ids, torch.ones_like(ids), baseline, mean_token_loss(targets, mask), **kw)
    assert not fired
    on_model = integrated_gradients(view, ids, torch.ones_like(ids), baseline, mean_token_loss(targets, mask), **kw)
    assert fired and torch.equal(on_twin.attributions, on_model.attributions)


def test_the_memory_ladder_runs_fewer_path_nodes_per_call_with_the_same_attributions(models):
    """The rungs lower the declared working memory (one forward+backward of fewer nodes) and change nothing
    else: pinned to chunk-1, the attributions equal the asked chunk's."""
    params = {"steps": 8, "chunk": 8}
    asked, _ = run(models["gpt2"], TEXTS, params)
    at_rung, pinned = run_at_rung(models["gpt2"], TEXTS, METRIC, "chunk-1", config=F64, **params)
    assert pinned.params["chunk"] == 1 and pinned.passes_declared["replay_backward"] > 0
    torch.testing.assert_close(at_rung.tensor(METRIC, "attributions"), asked.tensor(METRIC, "attributions"),
                               rtol=1e-12, atol=1e-14, equal_nan=True)
