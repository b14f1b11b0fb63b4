"""gradients.flow against per-batch backward passes written out in float64."""

from __future__ import annotations

import math

import pytest
import torch
from gradients_reference import batch_grads, group_slices, load_hf, padded_batches, tokenize

from tensorscope_core.errors import BadParameterError
from tensorscope_core.testing import check_declared_cost, run_metric

METRIC = "gradients.flow"


def reference(model: torch.nn.Module, grads: torch.Tensor, lr: float) -> dict[str, list[float]]:
    """Per group (blocks, outside, all): norm mean/var over batches, lr*mean/||theta||, and
    ||gbar|| / sqrt(tr S / B) from the explicit sample covariance of the batch gradients."""
    groups = [*group_slices(model), torch.ones(grads.shape[1], dtype=torch.bool)]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    out: dict[str, list[float]] = {"mean": [], "var": [], "ratio": [], "snr": []}
    B = grads.shape[0]
    for g in groups:
        part = grads[:, g]
        norms = part.norm(dim=1)
        centred = part - part.mean(dim=0)
        trace = float((centred**2).sum() / (B - 1))
        out["mean"].append(float(norms.mean()))
        out["var"].append(float(norms.var(unbiased=True)))
        out["ratio"].append(lr * float(norms.mean()) / float(theta[g].norm()))
        out["snr"].append(float(part.mean(dim=0).norm()) / (trace / B) ** 0.5)
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_flow_equals_float64_reference(family, models, texts, tokenizer):
    lr = 0.01
    result = run_metric(METRIC, models[family], texts, params={"learning_rate": lr}, dtype="float64", max_length=32)
    model = load_hf(models[family])
    want = reference(model, batch_grads(model, padded_batches(tokenize(tokenizer, texts))), lr)
    L = model.config.num_hidden_layers
    # LLaMA's float32 rotary angles move float64 gradients by ~1e-8 (see gradients_reference)
    rtol = 1e-9 if family == "gpt2" else 1e-6
    for field, key in (("grad_norm_mean", "mean"), ("grad_norm_var", "var"), ("update_ratio", "ratio"),
                       ("snr", "snr")):
        assert result.value(field) == pytest.approx(want[key][:L], rel=rtol), field
    assert result.value("outside_grad_norm") == pytest.approx(want["mean"][L], rel=rtol)
    assert result.value("total_grad_norm") == pytest.approx(want["mean"][L + 1], rel=rtol)
    assert result.value("total_update_ratio") == pytest.approx(want["ratio"][L + 1], rel=rtol)
    assert result.value("total_snr") == pytest.approx(want["snr"][L + 1], rel=rtol)
    total = result.values["total_grad_norm"]
    assert total.n == 3 and total.ci_low <= total.value <= total.ci_high
    check_declared_cost(result)


def test_one_batch_has_no_variance_or_snr(models, texts):
    """Variances and SNRs need two batches: with one they are NaN (null in JSON), the means are not."""
    result = run_metric(METRIC, models["gpt2"], texts[:4])
    assert all(math.isnan(v) for v in result.value("snr") + result.value("grad_norm_var"))
    assert all(v > 0 for v in result.value("grad_norm_mean"))


def test_bad_learning_rate_is_refused(models, texts):
    with pytest.raises(BadParameterError, match="learning_rate"):
        run_metric(METRIC, models["gpt2"], texts, params={"learning_rate": -1.0})
