"""The trainability probe of plasticity: K SGD steps on fixed random labels, on a copy of the weights."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tensorscope_core.plugin_api import Batch, LossTargets, ModelView, OneDeviceModel, batch_logits


def probe_labels(targets: LossTargets, vocab: int, seed: int) -> torch.Tensor:
    """Uniform random token labels (seeded) at the run's target positions: a new task the
    model has not seen, the same for the model and its fresh initialisation."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    return torch.randint(0, vocab, targets.target_ids.shape, generator=gen).to(targets.target_ids.device)


def _loss(view: ModelView, model: OneDeviceModel, batch: Batch, targets: LossTargets, labels: torch.Tensor,
          params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    logits = batch_logits(view, batch, targets, params, model)
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="none"
    )
    weights = targets.target_mask.reshape(-1).to(ce.dtype)
    return (ce * weights).sum() / weights.sum().clamp(min=1)


def _sgd_step(view: ModelView, model: OneDeviceModel, batch: Batch, targets: LossTargets, labels: torch.Tensor,
              params: dict[str, torch.Tensor], trained: list[str], lr: float) -> float:
    """One SGD step on ``params`` in place; the loss before it. The gradients are freed on return, so a
    step's backward never holds the previous step's gradients beside its own."""
    with torch.enable_grad():
        loss = _loss(view, model, batch, targets, labels, params)
        grads = torch.autograd.grad(loss, [params[n] for n in trained], allow_unused=True)
    with torch.no_grad():
        for name, grad in zip(trained, grads, strict=True):
            if grad is not None:
                params[name] -= lr * grad
    return float(loss.detach())


def trainability(
    view: ModelView,
    model: OneDeviceModel,
    batch: Batch,
    targets: LossTargets,
    labels: torch.Tensor,
    start: Mapping[str, torch.Tensor],
    trained: list[str],
    steps: int,
    lr: float,
) -> tuple[float, float]:
    """(L_0, L_K): the probe loss at ``start`` and after ``steps`` plain SGD steps of learning rate
    ``lr`` on the parameters named ``trained`` (the others stay at ``start``), run on ``model`` (a
    ``OneDeviceModel`` of every parameter: a dispatched model's loaded). The weights are copies: the model
    is never written. ``steps`` forward+backward passes and one forward."""
    params = {n: t.detach().clone() for n, t in start.items()}
    for name in trained:
        params[name].requires_grad_(True)
    first = None
    for _ in range(steps):
        loss = _sgd_step(view, model, batch, targets, labels, params, trained, lr)
        first = loss if first is None else first
    with torch.no_grad():
        last = float(_loss(view, model, batch, targets, labels, params))
    assert first is not None
    return first, last
