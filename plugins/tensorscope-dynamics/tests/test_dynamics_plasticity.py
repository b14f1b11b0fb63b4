"""dynamics.plasticity: the spec's known answers (dead units, srank 3), the probe against an
independent SGD loop on a deep copy, and the user's model left untouched."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tensorscope_dynamics.features import dormant_mask, srank
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from tensorscope_core import RunConfig, analyze
from tensorscope_core.testing import check_declared_cost, check_declared_passes, random_token_data

IDS = random_token_data(64, n=4, length=8, seed=3)
CONFIG = RunConfig(batch_size=4, seed=0)
PARAMS = {"k_steps": 3, "lr": 0.5, "srank_tokens": 24}


def _run(model, **params):
    res = analyze(
        model,
        data=IDS,
        metrics=["dynamics.plasticity"],
        params={"dynamics.plasticity": {**PARAMS, **params}},
        config=CONFIG,
    )
    result = res.get("dynamics.plasticity")
    assert result.ok, result.reason
    check_declared_passes(result)
    check_declared_cost(result)
    return result


def test_srank_of_three_equal_singular_values():
    """Spec: three equal singular values and the rest zero -> srank 3 (and the definition's edges)."""
    features = torch.zeros(10, 6, dtype=torch.float64)
    features[0, 0] = features[1, 1] = features[2, 2] = 2.0
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert srank(features @ q, 0.01) == 3
    assert srank(torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])), 0.01) == 4  # 0.9 < 0.99 until the last
    assert srank(torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])), 0.35) == 2  # 0.7 >= 0.65
    assert srank(torch.zeros(3, 3), 0.01) == 0


def _relu_gpt2(dead_block: int | None = None, dead_unit: tuple[int, int] | None = None) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=64,
            n_positions=16,
            n_embd=32,
            n_layer=2,
            n_head=4,
            activation_function="relu",
            attn_implementation="eager",
        )
    ).eval()
    with torch.no_grad():
        if dead_block is not None:  # every MLP unit of the block: pre-activation -1 -> relu 0
            model.transformer.h[dead_block].mlp.c_fc.weight.zero_()
            model.transformer.h[dead_block].mlp.c_fc.bias.fill_(-1.0)
        if dead_unit is not None:
            block, unit = dead_unit
            model.transformer.h[block].mlp.c_fc.weight[:, unit] = 0.0
            model.transformer.h[block].mlp.c_fc.bias[unit] = -1.0
    return model


def test_dead_units_have_zero_plasticity_and_are_dormant():
    """Spec: a block with all units dead has zero gradient and zero plasticity; a unit forced to 0
    is dormant at tau 0."""
    model = _relu_gpt2(dead_block=0, dead_unit=(1, 5))
    before = copy.deepcopy(model.state_dict())
    result = _run(model, tau=0.0)
    unit = result.value("unit_plasticity")
    assert unit[0] == 0.0 and unit[1] > 0.0
    assert result.value("dormant_fraction") == [1.0, 1.0 / 128]
    assert result.value("dormant_units") == 129
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model untouched


def _sgd_losses(model: torch.nn.Module, weights: list[torch.Tensor], labels: torch.Tensor) -> tuple[float, float]:
    """The probe loss before and after ``k_steps`` of torch.optim.SGD on ``weights``, each forward through
    the whole model (the reference the metric's probes are checked against)."""
    optimiser = torch.optim.SGD(weights, lr=PARAMS["lr"])

    def loss() -> torch.Tensor:
        logits = model(IDS).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, :-1].reshape(-1))

    first = float(loss().detach())
    for _ in range(PARAMS["k_steps"]):
        optimiser.zero_grad()
        loss().backward()
        optimiser.step()
    with torch.no_grad():
        return first, float(loss())


def test_plasticity_matches_an_independent_sgd_loop(models):
    """Independent reference: torch.optim.SGD on a deep copy, on the probe's labels (uniform tokens
    seeded with seed * 1_000_003 + 17 at the run's next-token targets)."""
    result = _run(models["gpt2"], per_block=False)
    model = AutoModelForCausalLM.from_pretrained(models["gpt2"], attn_implementation="eager").eval()
    labels = torch.randint(0, model.config.vocab_size, IDS.shape, generator=torch.Generator().manual_seed(17))
    trained = copy.deepcopy(model)
    first, last = _sgd_losses(trained, list(trained.parameters()), labels)
    assert result.value("probe_loss_start") == pytest.approx(first, rel=1e-5)
    assert result.value("probe_loss_end") == pytest.approx(last, rel=1e-4)
    assert result.value("plasticity") == pytest.approx(1 - last / first, rel=1e-3)
    # tiny_model builds its model with torch.manual_seed(0): the fresh initialisation at seed 0 is the model
    assert result.value("relative_plasticity") == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_unit_plasticity_matches_an_independent_sgd_loop_per_block(models, family):
    """Each block's probe (resumed at the block) against torch.optim.SGD on a deep copy whose only
    trainable tensor is that block's MLP output weight, every forward through the whole model."""
    result = _run(models[family], fresh=False)
    model = AutoModelForCausalLM.from_pretrained(models[family], attn_implementation="eager").eval()
    labels = torch.randint(0, model.config.vocab_size, IDS.shape, generator=torch.Generator().manual_seed(17))
    blocks = model.transformer.h if family == "gpt2" else model.model.layers
    want = []
    for layer in range(len(blocks)):
        trained = copy.deepcopy(model).requires_grad_(False)
        block = (trained.transformer.h if family == "gpt2" else trained.model.layers)[layer]
        weight = block.mlp.c_proj.weight if family == "gpt2" else block.mlp.down_proj.weight
        weight.requires_grad_(True)
        first, last = _sgd_losses(trained, [weight], labels)
        want.append(1 - last / first)
    # P = 1 - L_K / L_0 of float32 losses near 4: about 1e-7 of rounding in each loss ratio
    assert result.value("unit_plasticity") == pytest.approx(want, rel=1e-3, abs=1e-6)
    assert all(w != 0 for w in want)


def test_srank_and_dormancy_against_hooked_references(models):
    """srank of the first tokens' resid features and the dormant fraction from hooks placed by hand."""
    result = _run(models["llama"], per_block=False, fresh=False, tau=0.5)
    model = AutoModelForCausalLM.from_pretrained(models["llama"], attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(IDS, output_hidden_states=True)
    hidden = []
    handles = [
        layer.mlp.down_proj.register_forward_hook(lambda m, a, o: hidden.append(a[0])) for layer in model.model.layers
    ]
    resid_out = []
    handles.append(
        model.model.layers[-1].register_forward_hook(
            lambda m, a, o: resid_out.append(o[0] if isinstance(o, tuple) else o)
        )
    )
    with torch.no_grad():
        model(IDS)
    for h in handles:
        h.remove()
    entries = [*out.hidden_states[:-1], resid_out[0]]  # hidden_states[-1] is after the final norm
    want = []
    for x in entries:
        s = np.linalg.svd(x.reshape(-1, x.shape[-1])[:24].double().numpy(), compute_uv=False)
        want.append(float(np.searchsorted(np.cumsum(s) / s.sum(), 0.99 - 1e-12) + 1))
    assert result.value("srank") == want
    mean_abs = torch.stack([h.reshape(-1, h.shape[-1]).double().abs().mean(0) for h in hidden])
    assert result.value("dormant_fraction") == pytest.approx(
        ((mean_abs / mean_abs.mean(-1, keepdim=True)) <= 0.5).double().mean(-1).tolist()
    )
    assert "fresh initialisation" in result.value("note").text


def test_dormant_mask_ratio():
    mask = dormant_mask(torch.tensor([[0.0, 1.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0]]), 0.0)
    assert mask.tolist() == [[True, False, False, False], [True, True, True, True]]
