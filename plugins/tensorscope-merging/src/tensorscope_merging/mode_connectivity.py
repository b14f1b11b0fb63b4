"""merging.mode_connectivity: loss along the linear and a fitted Bezier path between two models."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field

from tensorscope_core import (
    Cost,
    Metric,
    MetricResult,
    ModelView,
    Params,
    RunShape,
    ScalarValue,
    SeriesValue,
    TextValue,
)
from tensorscope_core.core_artifacts import loss_targets
from tensorscope_core.data import PreparedData
from tensorscope_core.functional import batch_loss

from .evaluate import POOLED, Score, evaluate, loss_skip_reason
from .permutation import align, mlp_unit_axes
from .weights import check_compatible, members, number, parameters

Weights = dict[str, torch.Tensor]


class ConnectivityParams(Params):
    endpoints: list[str] | None = Field(None, min_length=2, max_length=2,
                                        description="the two models to connect; default: the two models of the "
                                                    "set (with a base and two fine-tunes: the fine-tunes)")
    n_points: int = Field(11, ge=2, description="evaluation points t = 0, 1/(n-1), ..., 1 along each path")
    bezier: bool = Field(True, description="fit and evaluate the quadratic Bezier path")
    bezier_steps: int = Field(20, ge=0, description="Adam steps fitting the Bezier middle point (one batch and "
                                                    "one t ~ U(0,1) per step, seeded by the run's seed)")
    bezier_lr: float = Field(1e-3, gt=0, description="Adam learning rate of the Bezier fit")
    align: bool = Field(False, description="permute the second model's MLP units to match the first (weight "
                                           "matching) and report the linear path after alignment too")


def linear_point(a: Weights, b: Weights, t: float) -> Weights:
    """``a + t (b - a)``: exactly ``a`` at t = 0 and wherever ``b == a``."""
    return {n: a[n] + t * (b[n] - a[n]) for n in a}


def bezier_point(a: Weights, m: Weights, b: Weights, t: float) -> Weights:
    """``(1-t)^2 a + 2t(1-t) m + t^2 b``, written as ``a + 2t(1-t)(m - a) + t^2 (b - a)``."""
    return {n: a[n] + 2 * t * (1 - t) * (m[n] - a[n]) + t * t * (b[n] - a[n]) for n in a}


def barrier(losses: list[float], ts: list[float]) -> float:
    """``max_t L(t) - ((1-t) L(0) + t L(1))`` (Frankle et al. 2020): 0 on a path no worse than the
    straight line between the endpoint losses."""
    return max(loss - ((1 - t) * losses[0] + t * losses[-1]) for loss, t in zip(losses, ts, strict=True))


def fit_bezier(view: ModelView, a: Weights, b: Weights, data: PreparedData, steps: int, lr: float,
               seed: int) -> tuple[Weights, list[float]]:
    """The middle point, started at the midpoint of a and b and moved by ``steps`` Adam steps on the
    loss at a random t of the curve (Garipov et al. 2018), and the loss of each step."""
    middle = {n: (a[n] + 0.5 * (b[n] - a[n])).clone().requires_grad_(True) for n in a}
    optimiser = torch.optim.Adam(list(middle.values()), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    batches = list(data.batches())
    history = []
    for step in range(steps):
        t = float(torch.rand((), generator=generator))
        batch = batches[step % len(batches)].to(str(next(iter(a.values())).device))
        loss = batch_loss(view, batch, loss_targets(view, batch, seed), bezier_point(a, middle, b, t))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append(float(loss.detach()))
    return {n: v.detach() for n, v in middle.items()}, history


def resolve_endpoints(params: ConnectivityParams, views: Mapping[str, ModelView],
                      base_name: str | None) -> tuple[str, str] | str:
    """The two models to connect, or why they cannot be chosen."""
    if params.endpoints is not None:
        unknown = [e for e in params.endpoints if e not in views]
        if unknown:
            return f"endpoints {unknown} are not models of this run ({list(views)})"
        return params.endpoints[0], params.endpoints[1]
    candidates = list(views) if len(views) == 2 else members(views, base_name)
    if len(candidates) != 2:
        return (f"connects two models and this run has {len(views)} ({list(views)}): name them with "
                "params={'merging.mode_connectivity': {'endpoints': [first, second]}}")
    return candidates[0], candidates[1]


class ModeConnectivity(Metric):
    """Loss (and next-token / masked-token accuracy) along paths between two models A and B, on the run's data.

    Linear path ``theta(t) = A + t (B - A)``; quadratic Bezier path ``(1-t)^2 A + 2t(1-t) M + t^2 B``
    whose middle point M starts at the midpoint and takes ``bezier_steps`` Adam steps (learning rate
    ``bezier_lr``) on the loss at a uniformly drawn t, one batch per step, seeded by the run's seed
    (Garipov et al., NeurIPS 2018). Each path is evaluated at ``n_points`` evenly spaced t on all of
    the data (token-mean loss). Barrier height: ``max_t L(t) - ((1-t) L(0) + t L(1))`` (>= 0; 0 for
    a path never above the line between the endpoint losses).

    With ``align``: B's MLP units are permuted to match A by weight matching (Git Re-Basin;
    ``scipy.optimize.linear_sum_assignment`` per block, applied to the MLP input projections'
    weights and biases and the output projection's weight), the linear path is evaluated again to
    A and the aligned B, and the Bezier path connects A to the aligned B. ``permutation[l, i]`` is
    the unit of B matched to unit i of A in block l.
    """

    name = "merging.mode_connectivity"
    version = "1"
    summary = "loss barrier along linear and fitted Bezier paths between two models, optionally after unit alignment"
    scope = "model_set"
    Params = ConnectivityParams
    fields = {
        "endpoints": "the two models connected, A then B",
        "t": "the evaluation points along each path",
        "loss_linear, accuracy_linear": "loss (nats) and top-1 accuracy along the linear path",
        "barrier_linear": "barrier height of the linear path",
        "loss_bezier, accuracy_bezier, barrier_bezier": "the same along the fitted Bezier path",
        "bezier_fit_loss": "the training loss of each Bezier fitting step",
        "loss_linear_aligned, accuracy_linear_aligned, barrier_linear_aligned": "linear path to the aligned B",
        "permutation": "[n_layers, d_mlp] unit of B matched to each unit of A (align)",
        "units_moved": "share of MLP units the alignment moved (align)",
    }

    @classmethod
    def cost(cls, params: Any, view: ModelView, shape: RunShape) -> Cost:
        """One path point, and with the Bezier fit its middle point, gradient and two Adam moments, in the
        parameters' dtype; FLOPs: a forward per evaluation point and path, a forward and backward per fitting step."""
        tokens = shape.n_batches * shape.batch_size * shape.seq_len
        paths = 1 + int(params.bezier) + int(params.align)
        flops = 2.0 * view.n_params * tokens * params.n_points * paths
        flops += 6.0 * view.n_params * shape.batch_size * shape.seq_len * params.bezier_steps * int(params.bezier)
        return Cost(state_bytes=(5 if params.bezier else 1) * view.param_bytes, flops=flops)

    @classmethod
    def uses_data(cls, params: Any) -> bool:
        return True

    @classmethod
    def set_skip_reason(cls, params: Any, views: Mapping[str, ModelView], base_name: str | None) -> str | None:
        chosen = resolve_endpoints(params, views, base_name)
        if isinstance(chosen, str):
            return chosen
        if params.align:
            try:
                mlp_unit_axes(views[chosen[0]], 0)
            except ValueError as exc:
                return f"align=True: {exc}"
        return loss_skip_reason({c: views[c] for c in chosen})

    def compute_set(self, views: Mapping[str, ModelView],
                    results: Mapping[str, Mapping[str, MetricResult]]) -> dict[str, Any]:
        p: ConnectivityParams = self.params
        chosen = resolve_endpoints(p, views, self.base_name)
        assert not isinstance(chosen, str)
        first, second = chosen
        check_compatible({first: views[first], second: views[second]})
        view, data, seed = views[first], self.data[first], self.shape.seed
        a, b = parameters(views[first]), parameters(views[second])
        ts = [i / (p.n_points - 1) for i in range(p.n_points)]
        out: dict[str, Any] = {"endpoints": TextValue(text=f"{first} -> {second}"),
                               "t": SeriesValue(values=ts, index_name="point")}
        out.update(self._path("linear", [evaluate(view, linear_point(a, b, t), data, seed)[POOLED] for t in ts], ts))
        if p.align:
            b, perms = align(view, a, b)
            path = [evaluate(view, linear_point(a, b, t), data, seed)[POOLED] for t in ts]
            out.update(self._path("linear_aligned", path, ts))
            out["permutation"] = perms
            identity = torch.arange(perms.shape[1]).expand_as(perms)
            out["units_moved"] = ScalarValue(value=float((perms != identity).double().mean()))
        if p.bezier:
            middle, history = fit_bezier(view, a, b, data, p.bezier_steps, p.bezier_lr, seed)
            path = [evaluate(view, bezier_point(a, middle, b, t), data, seed)[POOLED] for t in ts]
            out.update(self._path("bezier", path, ts))
            out["bezier_fit_loss"] = SeriesValue(values=history, index_name="step")
        return out

    @staticmethod
    def _path(label: str, scores: list[Score], ts: list[float]) -> dict[str, Any]:
        losses = [s.loss for s in scores]
        return {f"loss_{label}": SeriesValue(values=losses, index_name="point"),
                f"accuracy_{label}": SeriesValue(values=[s.accuracy for s in scores], index_name="point"),
                f"barrier_{label}": ScalarValue(value=number(barrier(losses, ts)), unit="nats")}
