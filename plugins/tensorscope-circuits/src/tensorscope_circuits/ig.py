"""Integrated gradients on the token embeddings: quadrature rules and the chunked computation.

IG_i = (x_i - x'_i) . integral_0^1 dF(x' + a (x - x')) / dx_i da  (Sundararajan et al., 2017),
the integral taken with a quadrature rule over ``steps`` nodes a_k with weights w_k:
IG_i ~= (x_i - x'_i) . sum_k w_k grad F(x' + a_k (x - x'))_i. The rules are Captum's
(``captum.attr._utils.approximation_methods``): Gauss-Legendre (its default; exact for
polynomials of degree 2 steps - 1 along the path) and the left, right, middle and
trapezoid Riemann sums.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from tensorscope_core.plugin_api import ModelView

from .interventions import token_ce

Rule = Literal["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"]
#: F per example: (logits [n, seq, vocab], rows [n] = the batch row each example is a copy of) -> [n];
#: ``seq`` may be shorter than the batch's (see ``reads`` in ``integrated_gradients``)
Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def quadrature(rule: Rule, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes a_k in [0, 1] and weights w_k (summing to 1) of ``rule`` with ``steps`` nodes, float64."""
    if steps < 1 or (rule == "riemann_trapezoid" and steps < 2):
        raise ValueError(f"rule {rule} needs at least {2 if rule == 'riemann_trapezoid' else 1} steps, got {steps}")
    n = steps
    if rule == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return torch.from_numpy(0.5 * (nodes + 1)), torch.from_numpy(0.5 * weights)
    if rule == "riemann_trapezoid":
        weights = np.full(n, 1.0 / (n - 1))
        weights[[0, -1]] = 0.5 / (n - 1)
        return torch.linspace(0, 1, n, dtype=torch.float64), torch.from_numpy(weights)
    start, stop = {"riemann_left": (0.0, 1 - 1 / n), "riemann_right": (1 / n, 1.0),
                   "riemann_middle": (1 / (2 * n), 1 - 1 / (2 * n))}[rule]
    return torch.linspace(start, stop, n, dtype=torch.float64), torch.full((n,), 1.0 / n, dtype=torch.float64)


def mean_token_loss(target_ids: torch.Tensor, target_mask: torch.Tensor) -> Objective:
    """F = each example's mean token cross-entropy over its targets (0 for an example without any).

    The logits may stop after the last target (``scored_extent``): no target is cut off.
    """
    def loss(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        seq = logits.shape[1]
        mask = target_mask[rows, :seq].to(logits.dtype)
        return token_ce(logits, target_ids[rows, :seq], mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return loss


def scored_extent(target_mask: torch.Tensor) -> int | None:
    """1 + the last position any sequence has a target at: the loss reads no logits after it
    (None: no targets at all)."""
    scored = target_mask.any(dim=0).nonzero()
    return int(scored.max()) + 1 if len(scored) else None


@contextmanager
def embeddings_replaced(view: ModelView, replacement: torch.Tensor) -> Iterator[None]:
    """During the block, the token embedding module returns ``replacement`` instead of its lookup."""
    handle = view.embed.register_forward_hook(lambda module, args, output: replacement)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class Attribution:
    """One batch: per-token attributions [batch, seq] (float64, summed over the embedding) and
    F at the input and at the baseline [batch] (float64)."""

    attributions: torch.Tensor
    at_input: torch.Tensor
    at_baseline: torch.Tensor

    @property
    def completeness_error(self) -> torch.Tensor:
        """sum_i IG_i - (F(x) - F(x')) per example: the quadrature error of the path integral."""
        return self.attributions.sum(-1) - (self.at_input - self.at_baseline)


def _forward(view: ModelView, points: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             copies: int) -> torch.Tensor:
    with embeddings_replaced(view, points):
        return view.model(input_ids=input_ids.repeat(copies, 1), attention_mask=attention_mask.repeat(copies, 1),
                          use_cache=False).logits


def integrated_gradients(view: ModelView, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         baseline: torch.Tensor, objective: Objective, *, steps: int, rule: Rule,
                         chunk: int, at_input: torch.Tensor | None = None, reads: int | None = None) -> Attribution:
    """IG of ``objective`` w.r.t. the token embeddings of one batch, from ``baseline`` [batch, seq, d_model].

    The path runs over the real tokens only (padding keeps its own embedding, so it gets no
    attribution). ``chunk`` nodes are evaluated per forward and backward, on ``chunk * batch``
    examples at once: that bounds the memory, not the result. ``at_input``: F(x) when the
    caller has it already (the shared pass's loss), which saves a forward. ``reads``: F reads
    the logits of the first ``reads`` positions only; in a causal model the later positions
    cannot reach them, so every forward leaves them out (a causal LM's loss: its last
    column, 1 / seq of the work) and their attributions are exactly 0, as their gradients are.
    """
    full = input_ids.shape[1]
    if view.causal and reads is not None and reads < full:
        cut = slice(None, reads)
        result = integrated_gradients(view, input_ids[:, cut], attention_mask[:, cut], baseline[:, cut], objective,
                                      steps=steps, rule=rule, chunk=chunk, at_input=at_input)
        attributions = torch.nn.functional.pad(result.attributions, (0, full - reads))
        return dataclasses.replace(result, attributions=attributions)
    b = input_ids.shape[0]
    rows = torch.arange(b, device=input_ids.device)
    with torch.no_grad():
        x = view.embed(input_ids)
        real = attention_mask.bool()[..., None]
        x0 = torch.where(real, baseline.to(x.dtype), x)
        if at_input is None:
            ends = objective(_forward(view, torch.cat([x, x0]), input_ids, attention_mask, 2), rows.repeat(2))
        else:
            ends = torch.cat([at_input.to(x.device), objective(_forward(view, x0, input_ids, attention_mask, 1), rows)])
        ends = ends.double()
    diff = x - x0
    del x  # only x0 and x - x0 are needed along the path
    nodes, weights = quadrature(rule, steps)
    path_grad = torch.zeros(diff.shape, dtype=torch.float64, device=diff.device)
    for start in range(0, steps, chunk):
        a = nodes[start:start + chunk].to(device=diff.device, dtype=diff.dtype)
        c = len(a)
        points = (x0[None] + a[:, None, None, None] * diff[None]).reshape(c * b, *diff.shape[1:])
        points.requires_grad_(True)
        with torch.enable_grad():
            values = objective(_forward(view, points, input_ids, attention_mask, c), rows.repeat(c))
            w = weights[start:start + c].to(device=diff.device, dtype=values.dtype).repeat_interleave(b)
            (grad,) = torch.autograd.grad((values * w).sum(), points)
        path_grad += grad.view(c, b, *diff.shape[1:]).sum(0).double()  # no float64 copy of the chunk
        del points, values, grad  # not alive during the next chunk's forward and backward
    return Attribution((diff.double() * path_grad).sum(-1), ends[:b], ends[b:])
