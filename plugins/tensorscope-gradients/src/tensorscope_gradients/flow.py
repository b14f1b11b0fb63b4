"""gradients.flow: per-block gradient norm statistics over batches, update/weight ratio and SNR."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    CountSketch,
    LayerValue,
    Metric,
    ModelView,
    Params,
    Rung,
    RunShape,
    ScalarValue,
    Step,
    bootstrap_ratio_ci,
)

from .common import block_squares
from .ladders import projection_rungs
from .maths import gini_sorted


class FlowParams(Params):
    learning_rate: float = Field(1e-3, gt=0, description="learning rate of the SGD step whose update "
                                                         "scale update_ratio compares to the weights")
    accumulate: Literal["float64", "float32"] = Field(
        "float64", description="dtype of the running sum of the batch gradients (the SNR's mean gradient)")
    projection_dim: int | None = Field(
        None, ge=1, description="keep only a count sketch of each block's summed gradient, this many entries per "
                                "block: the SNR from the sketched norm (None: the whole sum)")


class GradientFlow(Metric):
    """Per block l, over the run's batches b: g_lb is the block's part of the gradient of
    batch b's mean token loss (the core's ``param_grad``), n_lb = ||g_lb||_2.

    - ``grad_norm_mean`` = mean_b n_lb; ``grad_norm_var`` = the sample variance (ddof 1);
    - ``update_ratio`` = learning_rate * mean_b n_lb / ||theta_l||: the size of a plain SGD
      step relative to the block's weights;
    - ``snr`` = ||gbar_l|| / sqrt(tr S_l / B): the signal-to-noise ratio of the mean
      gradient gbar_l = mean_b g_lb over B batches, with tr S_l = sum_b ||g_lb - gbar_l||^2
      / (B - 1) the trace of the batch gradients' sample covariance (NaN below two batches).

    The same for all parameters together in ``total_*`` (the mean norm with a 95% bootstrap
    CI over batches) and for the parameters outside every block in ``outside_grad_norm``.

    Dispersion: ``grad_gini`` per block (``outside_grad_gini``, ``total_grad_gini``) is the Gini
    coefficient of x_j = |gbar_j| over the parameter entries j of the group, by the sample formula
    G = sum_i (2i - n - 1) x_(i) / (n sum_i x_i) on the x sorted ascending: 0 when every entry moves
    alike, 1 - 1/n when one entry of n carries the whole mean gradient. From the running sum the
    metric holds anyway (sorted in place at the end, no second copy); NaN with ``projection_dim``.

    ||gbar_l|| needs the running sum of the batch gradients, one number per parameter entry, in
    float64, or float32 (``accumulate``), or only a count sketch of each block's sum
    (``projection_dim`` = k: S sum_b g_lb, whose squared norm is ||sum_b g_lb||^2 within a relative
    SD of sqrt(2/k)). Memory ladder: float32, then sketches of 4096 and 1024 entries.
    """

    name = "gradients.flow"
    supports_dispatch = True  # the shared param_grad, which holds a dispatched model's offloaded weights' too
    version = "2"
    #: grad_norm_mean per block is basic.grad_norms' layer_norm (the same mean over batches of the block's
    #: gradient norm), and update_ratio is that norm scaled: equal by definition, never a finding
    derived_from = ("basic.grad_norms.layer_norm",)
    summary = "per-layer gradient norm mean/variance over batches, update/weight ratio, SNR of the mean gradient"
    Params = FlowParams
    artifacts = ("param_grad",)
    fields = {"grad_norm_mean": "per block: mean over batches of the block's gradient norm",
              "grad_norm_var": "per block: sample variance over batches of that norm",
              "update_ratio": "per block: learning_rate * grad_norm_mean / weight norm (SGD update scale)",
              "snr": "per block: ||mean gradient|| / sqrt(trace of its covariance / batches)",
              "outside_grad_norm": "mean over batches of the gradient norm outside the blocks",
              "total_grad_norm": "mean over batches of the global gradient norm, 95% bootstrap CI over batches",
              "total_update_ratio": "learning_rate * total_grad_norm / ||theta||",
              "total_snr": "the SNR of the whole mean gradient",
              "grad_gini": "per block: Gini coefficient of |mean gradient| over the block's parameter entries",
              "outside_grad_gini": "the same over the entries outside the blocks",
              "total_grad_gini": "the same over every trainable entry"}

    def setup(self) -> None:
        p = self.params
        self.layer_of = self.view.layer_of_parameter()
        trainable = [(n, t) for n, t in self.view.named_parameters() if t.requires_grad]
        dtype = torch.float64 if p.accumulate == "float64" else torch.float32
        # the running sum in one buffer, each group's entries contiguous (blocks in order, then outside), so the
        # Gini coefficients can sort each group's part, then the whole buffer, in place (``_gini``)
        L = self.view.n_layers
        group: dict[str, int] = {}
        for n, _ in trainable:
            layer = self.layer_of.get(n)
            group[n] = L if layer is None else layer
        sizes = [0] * (L + 1)
        for n, t in trainable:
            sizes[group[n]] += t.numel()
        self.bounds = [(sum(sizes[:g]), sum(sizes[:g + 1])) for g in range(L + 1)]
        cursor = [start for start, _ in self.bounds]
        self.spans: dict[str, tuple[int, int, tuple[int, ...]]] = {}  # name -> (start, stop, shape) in ``flat``
        for n, t in trainable:
            self.spans[n] = (cursor[group[n]], cursor[group[n]] + t.numel(), tuple(t.shape))
            cursor[group[n]] += t.numel()
        self.flat = torch.zeros(0 if p.projection_dim else sum(sizes), dtype=dtype)
        # sketches: S sum_b g_lb per group; each parameter has its own seeded buckets and signs
        self.sketches = torch.zeros(self.view.n_layers + 1 if p.projection_dim else 0, p.projection_dim or 0,
                                    dtype=torch.float64)
        self.sketchers = {n: CountSketch(t.numel(), p.projection_dim, self.shape.seed * 100_003 + i)
                          for i, (n, t) in enumerate(trainable)} if p.projection_dim else {}
        self.per_batch = torch.zeros(self.shape.n_batches, self.view.n_layers + 2, dtype=torch.float64)
        self.seen = 0

    @classmethod
    def cost(cls, params: FlowParams, view: ModelView, shape: RunShape) -> Cost:
        """The running sum (one entry per parameter entry, or k per group sketched) and the per-batch
        squared norms, float64 [B, L + 2]."""
        n_params = sum(p.numel() for _, p in view.named_parameters() if p.requires_grad)
        if params.projection_dim:
            sums = 8 * (view.n_layers + 1) * params.projection_dim
        else:
            sums = (8 if params.accumulate == "float64" else 4) * n_params
        return Cost(state_bytes=sums + 8 * shape.n_batches * (view.n_layers + 2),
                    flops=float(3 * n_params * shape.n_batches))

    @classmethod
    def ladder(cls, params: FlowParams, view: ModelView, shape: RunShape) -> Sequence[Rung]:
        """float32 sums, then sketched sums (see the class)."""
        float32 = [Rung("float32", params.model_copy(update={"accumulate": "float32"}),
                        "the mean gradient (SNR) summed in float32: off by ~6e-8 x batches of the batch "
                        "gradients' size")]
        rungs = (float32 if params.accumulate == "float64" and not params.projection_dim else []) \
            + projection_rungs(params, _sketch_accuracy)
        return cls.cheaper_rungs(params, view, shape, rungs)

    def update(self, step: Step) -> None:
        grads = step["param_grad"]
        squares = block_squares(self.view, self.layer_of, grads)
        self.per_batch[self.seen, :-1] = squares
        self.per_batch[self.seen, -1] = squares.sum()
        sums = self.sums()
        for name, g in grads.items():
            if name in sums:
                sums[name] += g.detach().cpu().to(self.flat.dtype)
            elif name in self.sketchers:
                layer = self.layer_of.get(name)
                group = self.view.n_layers if layer is None else layer
                self.sketches[group] += self.sketchers[name](g.detach().reshape(1, -1))[0]
        self.seen += 1

    def sums(self) -> dict[str, torch.Tensor]:
        """The running sum of each parameter's batch gradients: views into ``flat`` (named_parameters
        order; empty when sketched)."""
        if not self.flat.numel():
            return {}
        return {n: self.flat[a:b].view(shape) for n, (a, b, shape) in self.spans.items()}

    def _gini(self) -> tuple[list[float], float]:
        """Gini coefficients of |mean gradient| per entry (``maths.gini_sorted``; the mean's 1/B cancels),
        per group and over all trainable entries, sorting ``flat`` in place (so call it last): no second
        parameter-sized copy. NaN when sketched (no per-entry mean is kept)."""
        if not self.flat.numel():
            return [math.nan] * len(self.bounds), math.nan
        flat = self.flat.numpy()
        np.abs(flat, out=flat)
        per_group = []
        for start, stop in self.bounds:
            flat[start:stop].sort()
            per_group.append(gini_sorted(flat[start:stop]))
        flat.sort()
        return per_group, gini_sorted(flat)

    def finalize(self) -> dict[str, object]:
        L, B = self.view.n_layers, self.seen
        squares = self.per_batch[:B]  # squared norms per batch, per group
        norms = squares.sqrt()
        # ||sum_b g_lb||^2 per group (sketched: ||S sum_b g_lb||^2)
        sums = self.sums()
        mean_sum = block_squares(self.view, self.layer_of, sums) if sums else self.sketches.pow(2).sum(dim=1)
        mean_sq = torch.cat([mean_sum, mean_sum.sum()[None]]) / B**2  # ||gbar||^2
        if B > 1:
            trace = (squares.sum(dim=0) - B * mean_sq) / (B - 1)
            snr = mean_sq.sqrt() / (trace.clamp(min=0) / B).sqrt()
            var = norms.var(dim=0, unbiased=True)
        else:
            snr = torch.full((L + 2,), math.nan, dtype=torch.float64)
            var = torch.full((L + 2,), math.nan, dtype=torch.float64)
        trainable = {n for n, p in self.view.named_parameters() if p.requires_grad}
        weights = block_squares(self.view, self.layer_of,
                                ((n, w) for n, w in self.view.named_weights() if n in trainable))
        weight_norm = torch.cat([weights, weights.sum()[None]]).sqrt()
        lr = self.params.learning_rate
        mean = norms.mean(dim=0)
        ratio = lr * mean / weight_norm
        total = norms[:, -1].tolist()
        low, high = bootstrap_ratio_ci(total, [1.0] * len(total), seed=self.shape.seed)
        gini, total_gini = self._gini()
        return {"grad_norm_mean": LayerValue(values=mean[:L].tolist(), axis="block"),
                "grad_norm_var": LayerValue(values=var[:L].tolist(), axis="block"),
                "update_ratio": LayerValue(values=ratio[:L].tolist(), axis="block"),
                "snr": LayerValue(values=snr[:L].tolist(), axis="block"),
                "outside_grad_norm": ScalarValue(value=float(mean[L]), n=B),
                "total_grad_norm": ScalarValue(value=float(mean[-1]), ci_low=low, ci_high=high, n=B),
                "total_update_ratio": ScalarValue(value=float(ratio[-1]), n=B),
                "total_snr": ScalarValue(value=float(snr[-1]), n=B),
                "grad_gini": LayerValue(values=gini[:L], axis="block"),
                "outside_grad_gini": ScalarValue(value=gini[L]),
                "total_grad_gini": ScalarValue(value=total_gini)}


def _sketch_accuracy(k: int) -> str:
    return (f"||mean gradient||^2 per block off by +-{math.sqrt(2 / k):.3f} relative (1 SD; count sketch of {k} "
            "entries per block): SNR off by about half that x (1 + SNR^2 / (batches - 1))")
