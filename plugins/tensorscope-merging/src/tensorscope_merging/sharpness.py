"""landscape.sharpness: SAM sharpness (Foret et al., ICLR 2021) and Hutchinson's Hessian trace.

Both are functions of a batch's loss around the weights theta. The algorithms take a
``loss_fn(params) -> scalar`` so that the same code runs on a model's batch loss and on
the quadratics the tests know in closed form.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    Metric,
    ModelView,
    Params,
    RunShape,
    ScalarValue,
    Step,
    act_bytes,
    batch_loss,
    bootstrap_ci,
    float64_dot,
    float64_sum_of_squares,
    offloaded_bytes,
    trainable_model,
)

from .passes import loss_batches

Tensors = dict[str, torch.Tensor]
LossFn = Callable[[Tensors], torch.Tensor]


class SharpnessParams(Params):
    rho: float = Field(0.05, gt=0, description="radius of the perturbation ball (L2 over all parameters)")
    ascent_steps: int = Field(5, ge=1, description="projected gradient-ascent steps for the multi-step estimate "
                                                   "(1: the first-order SAM point only)")
    hutchinson_probes: int = Field(8, ge=0, description="Rademacher probes per batch for the Hessian trace "
                                                        "(0: no trace)")
    max_batches: int | None = Field(4, ge=1, description="use the run's first this many batches; None: all")
    probe_seed: int = Field(0, description="seed of the Rademacher probes")


@dataclass(frozen=True)
class SamEstimate:
    """Loss at theta and the loss increases at the first-order SAM point and along the ascent."""

    loss: float
    first_order: float
    ascent: float


def _norm(v: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all tensors together, squared and summed in float64 a chunk at a time (no float64
    copy of a weight-sized tensor)."""
    return torch.sqrt(sum((float64_sum_of_squares(t).cpu() for t in v.values()),
                          torch.zeros((), dtype=torch.float64)))


def _grad(loss_fn: LossFn, point: Tensors) -> tuple[torch.Tensor, Tensors]:
    leaves = {n: t.detach().requires_grad_(True) for n, t in point.items()}
    loss = loss_fn(leaves)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return loss.detach(), {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(leaves.items(), grads,
                                                                                              strict=True)}


def sam_sharpness(loss_fn: LossFn, theta: Mapping[str, torch.Tensor], rho: float, steps: int,
                  held: dict[str, Any] | None = None) -> SamEstimate:
    """First-order SAM: eps = rho * g / ||g|| with g the gradient at theta, sharpness
    L(theta + eps) - L(theta). Multi-step: projected gradient ascent on the ball ||eps|| <= rho
    with the fixed step rho / ||g|| (so its first iterate is the SAM point),
    ``eps <- P(eps + rho / ||g|| * grad L(theta + eps))``; ``ascent`` is the largest increase
    over its iterates (never below the first-order value). A zero gradient gives 0 for both.

    ``held`` (a dict the caller keeps) holds what the ascent holds, three copies of theta at most:
    ``eps``, the perturbed weights ``point`` and the gradient ``grad`` there (each dropped before
    its successor is made)."""
    held = {} if held is None else held
    loss0, held["grad"] = _grad(loss_fn, dict(theta))
    g_norm = float(_norm(held["grad"]))
    if g_norm == 0.0:
        return SamEstimate(float(loss0), 0.0, 0.0)
    lr = rho / g_norm
    held["eps"] = {n: torch.zeros_like(t) for n, t in theta.items()}
    increases = []
    for _ in range(steps):
        held["point"] = {}
        # eps + lr * grad, written into the gradient's storage (the gradient is not needed after it)
        eps = {n: held["grad"][n].mul_(lr).add_(e) for n, e in held["eps"].items()}
        held["grad"] = held["eps"] = {}
        size = float(_norm(eps))
        if size > rho:
            for e in eps.values():
                e.mul_(rho / size)
        held["eps"] = eps
        del eps
        held["point"] = {n: theta[n] + held["eps"][n] for n in theta}
        loss, held["grad"] = _grad(loss_fn, held["point"])
        increases.append(float(loss) - float(loss0))
    return SamEstimate(float(loss0), increases[0], max(increases))


def _rademacher(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Entries +-1 shaped like ``like``, drawn in its dtype (the same values as drawing int64 0/1 and
    casting, without the two int64 copies of the tensor)."""
    return torch.randint(0, 2, like.shape, generator=gen, dtype=like.dtype).mul_(2).sub_(1).to(like.device)


def hutchinson_trace(loss_fn: LossFn, theta: Mapping[str, torch.Tensor], probes: int,
                     gen: torch.Generator, held: dict[str, Any] | None = None) -> torch.Tensor:
    """``z^T H z`` for ``probes`` Rademacher vectors z (unbiased for tr H; exact when H is
    diagonal), H the Hessian of ``loss_fn`` at theta, by double backward. float64 [probes].

    ``held`` (a dict the caller keeps) holds the gradient with its graph (``grad``), the probe
    (``eps``) and its Hessian-vector product (``point``): three copies of theta, as the ascent."""
    held = {} if held is None else held
    leaves = {n: t.detach().requires_grad_(True) for n, t in theta.items()}
    loss = loss_fn(leaves)
    grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
    used = [(t, g) for t, g in zip(leaves.values(), grads, strict=True) if g is not None]
    held["grad"] = [g for _, g in used]
    out = torch.empty(probes, dtype=torch.float64)
    for k in range(probes):
        held["eps"] = held["point"] = []
        held["eps"] = [_rademacher(t, gen) for t, _ in used]
        held["point"] = torch.autograd.grad(held["grad"], [t for t, _ in used], grad_outputs=held["eps"],
                                            retain_graph=True)
        out[k] = sum(float(float64_dot(z, h)) for z, h in zip(held["eps"], held["point"], strict=True))
    return out


class Sharpness(Metric):
    """Sharpness of the loss around the weights theta, per batch of the run (the first
    ``max_batches``), then averaged over batches.

    - ``sharpness_first_order``: L(theta + eps) - L(theta) at the first-order SAM point
      eps = rho * g / ||g|| (Foret et al. 2021), g the batch loss gradient over all trainable
      parameters (one L2 ball over all of them);
    - ``sharpness_ascent``: the largest increase found by ``ascent_steps`` steps of projected
      gradient ascent on the ball with the fixed step rho / ||g|| (the first step lands on
      the SAM point, so it is never below the first-order value; on a quadratic it approaches
      the exact maximum over the ball);
    - ``hessian_trace``: Hutchinson's estimate mean_z z^T H z with Rademacher z
      (``hutchinson_probes`` per batch, Hessian-vector products by double backward), with
      a 95% bootstrap CI over all probes of all batches.

    The loss is the run's token loss of each batch through a hook-free copy with the
    perturbed weights passed in; the model is never modified. On a dispatched model every weight is
    loaded onto the input device for the batch's computation (``trainable_model``).
    """

    name = "landscape.sharpness"
    version = "1"
    summary = "SAM sharpness (first-order and multi-step ascent) and the Hutchinson Hessian trace"
    Params = SharpnessParams
    artifacts = ("batches",)  # the batches only: it makes its own passes over them
    supports_dispatch = True  # its forwards run on trainable_model, which loads a dispatched model's weights
    fields = {"loss": "mean batch loss at theta over the batches used",
              "sharpness_first_order": "mean over batches of L(theta + rho g/||g||) - L(theta)",
              "sharpness_ascent": "mean over batches of the largest increase found by projected gradient ascent",
              "hessian_trace": "Hutchinson estimate of tr(H), 95% bootstrap CI over probes",
              "batches": "batches used"}

    @classmethod
    def cost(cls, params: SharpnessParams, view: ModelView, shape: RunShape) -> Cost:
        """State: three copies of the trainable weights (``held``: the perturbation, the perturbed weights
        and the gradient there; the Hutchinson step's gradient, probe and Hessian-vector product) and the
        per-batch values. Transient: each backward's activations and, with tied embeddings, the second
        gradient of the embedding until the two are summed; with probes, the Hessian-vector product's
        terms for the [vocab, d] matrix (two of them at once, made while the first backward's graph is
        held); on a dispatched model the weights loaded onto the input device (``offloaded_bytes``)."""
        batches = shape.n_batches if params.max_batches is None else min(shape.n_batches, params.max_batches)
        n_params = sum(p.numel() for p in view.model.parameters() if p.requires_grad)
        backward = 6.0 * n_params * shape.batch_size * shape.seq_len
        per_batch = backward * (1 + params.ascent_steps + 2 * params.hutchinson_probes)
        n_probes = batches * params.hutchinson_probes
        copies = 3 * sum(p.numel() * p.element_size() for p in view.model.parameters() if p.requires_grad)
        transient = act_bytes(view, shape.batch_size, shape.seq_len) + view.tied_embedding_bytes \
            + offloaded_bytes(view)
        if params.hutchinson_probes:
            transient += 2 * view.vocab_size * view.d_model * view.dtype_bytes
        return Cost(state_bytes=copies + 8 * (3 * batches + n_probes), transient_bytes=transient,
                    flops=float(per_batch * batches))

    @classmethod
    def own_passes(cls, params: SharpnessParams, view: ModelView, shape: RunShape) -> dict[str, int]:
        """Per batch used (the first ``max_batches`` with a loss target), every call differentiated:
        the gradient at theta, one gradient per ascent step, and with probes one double-backward
        graph shared by all of them: ``(1 + ascent_steps + [hutchinson_probes > 0]) * batches``.

        A planned count: a batch whose loss gradient is exactly zero stops after the first call
        (no ascent), which the declaration cannot foresee."""
        per_batch = 1 + params.ascent_steps + int(params.hutchinson_probes > 0)
        return {"replay_backward": per_batch * loss_batches(view, shape, params.max_batches)}

    def setup(self) -> None:
        cap = self.shape.n_batches if self.params.max_batches is None else min(self.shape.n_batches,
                                                                                self.params.max_batches)
        self.per_batch = torch.zeros(cap, 3, dtype=torch.float64)  # loss, first order, ascent
        self.traces = torch.zeros(cap * self.params.hutchinson_probes, dtype=torch.float64)
        self.gen = torch.Generator().manual_seed(self.params.probe_seed)
        self.seen = 0
        #: the model-sized tensors of the step being computed (see ``sam_sharpness``, ``hutchinson_trace``)
        self.held: dict[str, Any] = {}

    def update(self, step: Step) -> None:
        if self.seen >= self.per_batch.shape[0]:
            return
        view, batch, targets = self.view, step.batch, step.targets
        if targets.n_targets == 0:
            return
        model = trainable_model(view)
        theta = model.weights

        def loss_fn(params: Tensors) -> torch.Tensor:
            return batch_loss(view, batch, targets, params, model)

        k = self.params.hutchinson_probes
        if k:
            self.held = {}
            self.traces[self.seen * k:(self.seen + 1) * k] = hutchinson_trace(loss_fn, theta, k, self.gen, self.held)
        self.held = {}
        sam = sam_sharpness(loss_fn, theta, self.params.rho, self.params.ascent_steps, self.held)
        self.per_batch[self.seen] = torch.tensor([sam.loss, sam.first_order, sam.ascent], dtype=torch.float64)
        self.seen += 1

    def finalize(self) -> dict[str, Any]:
        if self.seen == 0:
            raise ValueError("no batch had a loss target: sharpness needs data with at least two tokens per "
                             "sequence (causal) or a mask token (masked LM)")
        rows = self.per_batch[:self.seen]
        out: dict[str, Any] = {
            "loss": ScalarValue(value=float(rows[:, 0].mean()), n=self.seen, unit="nats",
                                samples=rows[:, 0].tolist()),
            "sharpness_first_order": ScalarValue(value=float(rows[:, 1].mean()), n=self.seen, unit="nats",
                                                 samples=rows[:, 1].tolist()),
            "sharpness_ascent": ScalarValue(value=float(rows[:, 2].mean()), n=self.seen, unit="nats",
                                            samples=rows[:, 2].tolist()),
            "batches": ScalarValue(value=float(self.seen))}
        k = self.params.hutchinson_probes
        if k:
            traces = self.traces[:self.seen * k]
            low, high = bootstrap_ci(traces.tolist(), seed=self.shape.seed)
            out["hessian_trace"] = ScalarValue(value=float(traces.mean()), ci_low=low, ci_high=high, n=len(traces))
        return out
