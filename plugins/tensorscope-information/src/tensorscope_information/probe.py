"""A linear softmax probe: the variational distribution q(y | h) of the Barber-Agakov bound and
the model class of the online (MDL) code.

Inputs are standardised with the training rows' mean and standard deviation; the weights
start at zero and are fitted by full-batch L-BFGS on the mean cross-entropy plus an L2
penalty, so a fit is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Probe:
    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.scale) @ self.weight + self.bias


def fit_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, max_iter: int) -> Probe:
    """Fit on rows ``x`` [n, d] with classes ``y`` in 0..n_classes - 1."""
    x = x.float()
    mean = x.mean(0)
    scale = x.std(0, correction=0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1])
    z = (x - mean) / scale
    weight = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    bias = torch.zeros(n_classes, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight + bias, y) + l2 * (weight * weight).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    return Probe(mean, scale, weight.detach(), bias.detach())


def token_nll(probe: Probe, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-ln q(y | h) of every row (float64, nats)."""
    logp = torch.log_softmax(probe.logits(x.float()).double(), dim=-1)
    return -logp.gather(1, y[:, None]).squeeze(1)
