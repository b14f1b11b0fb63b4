"""merging.mode_connectivity: loss along the linear and a fitted Bezier path between two models."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    MetricResult,
    ModelSetMetric,
    ModelView,
    Params,
    PreparedData,
    Rung,
    RunShape,
    ScalarValue,
    SeriesValue,
    TextValue,
    align,
    aligned_bytes,
    batch_loss,
    mlp_unit_axes,
)

from .evaluate import POOLED, Score, TargetsFn, evaluate, loss_skip_reason
from .weights import check_compatible, members, number, parameters

Weights = dict[str, torch.Tensor]

#: the rungs: the linear path only (no Bezier fit), then without the unit alignment too
LINEAR, LINEAR_UNALIGNED = "linear", "linear_unaligned"


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
               seed: int, targets_of: TargetsFn, held: dict[str, Any] | None = None) -> tuple[Weights, list[float]]:
    """The middle point, started at the midpoint of a and b and moved by ``steps`` Adam steps on the
    loss at a random t of the curve (Garipov et al. 2018), and the loss of each step.

    ``seed`` draws the t of each step; ``targets_of`` gives the run's loss targets of a batch.
    ``held`` (a dict the caller keeps) gets what the fit holds at its peak, for the caller's state:
    ``middle`` (the fitted tensors), ``point`` (the curve point of the step), after the fit ``grads``
    (the last step's gradients) and ``moments`` (Adam's two moment estimates of every tensor)."""
    held = {} if held is None else held
    middle = {n: (a[n] + 0.5 * (b[n] - a[n])).clone().requires_grad_(True) for n in a}
    held["middle"] = middle
    optimiser = torch.optim.Adam(list(middle.values()), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    batches = list(data.batches())
    history = []
    for step in range(steps):
        t = float(torch.rand((), generator=generator))
        batch = batches[step % len(batches)].to(str(next(iter(a.values())).device))
        held["point"] = {}
        held["point"] = bezier_point(a, middle, b, t)
        loss = batch_loss(view, batch, targets_of(view, batch), held["point"])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append(float(loss.detach()))
    held["grads"] = [v.grad for v in middle.values() if v.grad is not None]
    held["moments"] = [optimiser.state[v][k] for v in middle.values() for k in ("exp_avg", "exp_avg_sq")
                       if k in optimiser.state[v]]
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


class ModeConnectivity(ModelSetMetric):
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
    version = "2"
    summary = "loss barrier along linear and fitted Bezier paths between two models, optionally after unit alignment"
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
        """In the parameters' dtype: one path point (``point``, the weights evaluated or fitted at);
        with ``bezier`` the middle point, and when it takes Adam steps also its gradient and Adam's
        two moments (``fit``); with ``align`` the permuted copies of the MLP weights of the second
        endpoint (``aligned``). The endpoints are the members' own weights, read, not copied.
        FLOPs: a forward per evaluation point and path, a forward and backward per fitting step."""
        tokens = shape.n_batches * shape.batch_size * shape.seq_len
        paths = 1 + int(params.bezier) + int(params.align)
        flops = 2.0 * view.n_params * tokens * params.n_points * paths
        flops += 6.0 * view.n_params * shape.batch_size * shape.seq_len * params.bezier_steps * int(params.bezier)
        copies = 1 + (0 if not params.bezier else 4 if params.bezier_steps > 0 else 1)
        return Cost(state_bytes=copies * view.param_bytes + (aligned_bytes(view) if params.align else 0), flops=flops)

    @classmethod
    def ladder(cls, params: Any, view: ModelView, shape: RunShape) -> Sequence[Rung]:
        """The Bezier fit holds four model copies besides the path point: without it one copy is left
        (``linear``), and without the alignment's permuted MLP weights too (``linear_unaligned``)."""
        rungs = []
        if params.bezier:
            rungs.append(Rung(LINEAR, params.model_copy(update={"bezier": False}),
                              "linear path exact; the Bezier path (loss_bezier, barrier_bezier, bezier_fit_loss) "
                              "left out"))
        if params.align and aligned_bytes(view):
            rungs.append(Rung(LINEAR_UNALIGNED, params.model_copy(update={"bezier": False, "align": False}),
                              "linear path exact; the Bezier path and the aligned path (loss_linear_aligned, "
                              "permutation) left out"))
        return rungs

    @classmethod
    def own_passes(cls, params: Any, view: ModelView, shape: RunShape, members: Sequence[str],
                   base_name: str | None) -> dict[str, int]:
        """On the first endpoint's data: one forward per evaluation point and batch of each path
        evaluated (linear, with ``align`` the aligned linear, with ``bezier`` the Bezier):
        ``n_points * n_batches * (1 + align + bezier)``; the Bezier fit differentiates one call per
        step: ``bezier_steps`` (with ``bezier``). Independent of ``members``: two endpoints."""
        paths = 1 + int(params.align) + int(params.bezier)
        own = {"replay_forward": params.n_points * shape.n_batches * paths}
        if params.bezier:
            own["replay_backward"] = params.bezier_steps
        return own

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

    def setup(self) -> None:
        #: what compute_set holds (see ``cost``): the current path point, the Bezier fit's middle
        #: point, gradients and Adam moments, and the aligned endpoint's permuted MLP weights
        self.point: Weights = {}
        self.fit: dict[str, Any] = {}
        self.aligned: Weights = {}

    def compute_set(self, views: Mapping[str, ModelView],
                    results: Mapping[str, Mapping[str, MetricResult]]) -> dict[str, Any]:
        p: ConnectivityParams = self.params
        chosen = resolve_endpoints(p, views, self.base_name)
        assert not isinstance(chosen, str)
        first, second = chosen
        check_compatible({first: views[first], second: views[second]})
        view, data, seed, targets_of = views[first], self.data[first], self.shape.seed, self.loss_targets
        a, b = parameters(views[first]), parameters(views[second])
        ts = [i / (p.n_points - 1) for i in range(p.n_points)]
        out: dict[str, Any] = {"endpoints": TextValue(text=f"{first} -> {second}"),
                               "t": SeriesValue(values=ts, index_name="point")}
        path = [self._score(view, data, functools.partial(linear_point, a, b, t)) for t in ts]
        out.update(self._path("linear", path, ts))
        if p.align:
            unaligned = b
            b, perms = align(view, a, b)
            self.aligned = {n: w for n, w in b.items() if w is not unaligned[n]}  # the permuted copies
            path = [self._score(view, data, functools.partial(linear_point, a, b, t)) for t in ts]
            out.update(self._path("linear_aligned", path, ts))
            out["permutation"] = perms
            identity = torch.arange(perms.shape[1]).expand_as(perms)
            out["units_moved"] = ScalarValue(value=float((perms != identity).double().mean()))
        if p.bezier:
            self.point = {}  # the fit holds its own point
            middle, history = fit_bezier(view, a, b, data, p.bezier_steps, p.bezier_lr, seed, targets_of,
                                         held=self.fit)
            self.fit.pop("point", None)  # the last fitting step's: the evaluation holds its own
            path = [self._score(view, data, functools.partial(bezier_point, a, middle, b, t)) for t in ts]
            out.update(self._path("bezier", path, ts))
            out["bezier_fit_loss"] = SeriesValue(values=history, index_name="step")
        return out

    def _score(self, view: ModelView, data: PreparedData, point: Callable[[], Weights]) -> Score:
        """The pooled score at the weights ``point()`` makes, held as ``self.point`` while evaluated
        (the previous point is dropped first)."""
        self.point = {}
        self.point = point()
        return evaluate(view, self.point, data, self.loss_targets)[POOLED]

    @staticmethod
    def _path(label: str, scores: list[Score], ts: list[float]) -> dict[str, Any]:
        losses = [s.loss for s in scores]
        return {f"loss_{label}": SeriesValue(values=losses, index_name="point"),
                f"accuracy_{label}": SeriesValue(values=[s.accuracy for s in scores], index_name="point"),
                f"barrier_{label}": ScalarValue(value=number(barrier(losses, ts)), unit="nats")}
