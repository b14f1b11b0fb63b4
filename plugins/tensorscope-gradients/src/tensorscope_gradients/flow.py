"""gradients.flow: per-block gradient norm statistics over batches, update/weight ratio and SNR."""

from __future__ import annotations

import math

import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    LayerValue,
    Metric,
    ModelView,
    Params,
    RunShape,
    ScalarValue,
    Step,
    bootstrap_ratio_ci,
)

from .common import block_squares


class FlowParams(Params):
    learning_rate: float = Field(1e-3, gt=0, description="learning rate of the SGD step whose update "
                                                         "scale update_ratio compares to the weights")


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
    """

    name = "gradients.flow"
    version = "1"
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
              "total_snr": "the SNR of the whole mean gradient"}

    def setup(self) -> None:
        self.layer_of = self.view.layer_of_parameter()
        self.sums = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in self.view.model.named_parameters()
                     if p.requires_grad}
        self.per_batch = torch.zeros(self.shape.n_batches, self.view.n_layers + 2, dtype=torch.float64)
        self.seen = 0

    @classmethod
    def cost(cls, params: FlowParams, view: ModelView, shape: RunShape) -> Cost:
        n_params = sum(p.numel() for p in view.model.parameters() if p.requires_grad)
        return Cost(state_bytes=8 * n_params + 8 * shape.n_batches * (view.n_layers + 2),
                    flops=float(3 * n_params * shape.n_batches))

    def update(self, step: Step) -> None:
        grads = step["param_grad"]
        squares = block_squares(self.view, self.layer_of, grads)
        self.per_batch[self.seen, :-1] = squares
        self.per_batch[self.seen, -1] = squares.sum()
        for name, g in grads.items():
            if name in self.sums:
                self.sums[name] += g.detach().double().cpu()
        self.seen += 1

    def finalize(self) -> dict[str, object]:
        L, B = self.view.n_layers, self.seen
        squares = self.per_batch[:B]  # squared norms per batch, per group
        norms = squares.sqrt()
        mean_sum = block_squares(self.view, self.layer_of, self.sums)  # ||sum_b g_lb||^2 per group
        mean_sq = torch.cat([mean_sum, mean_sum.sum()[None]]) / B**2  # ||gbar||^2
        if B > 1:
            trace = (squares.sum(dim=0) - B * mean_sq) / (B - 1)
            snr = mean_sq.sqrt() / (trace.clamp(min=0) / B).sqrt()
            var = norms.var(dim=0, unbiased=True)
        else:
            snr = torch.full((L + 2,), math.nan, dtype=torch.float64)
            var = torch.full((L + 2,), math.nan, dtype=torch.float64)
        weights = block_squares(self.view, self.layer_of,
                                {n: p.detach() for n, p in self.view.model.named_parameters() if p.requires_grad})
        weight_norm = torch.cat([weights, weights.sum()[None]]).sqrt()
        lr = self.params.learning_rate
        mean = norms.mean(dim=0)
        ratio = lr * mean / weight_norm
        total = norms[:, -1].tolist()
        low, high = bootstrap_ratio_ci(total, [1.0] * len(total), seed=self.shape.seed)
        return {"grad_norm_mean": LayerValue(values=mean[:L].tolist(), axis="block"),
                "grad_norm_var": LayerValue(values=var[:L].tolist(), axis="block"),
                "update_ratio": LayerValue(values=ratio[:L].tolist(), axis="block"),
                "snr": LayerValue(values=snr[:L].tolist(), axis="block"),
                "outside_grad_norm": ScalarValue(value=float(mean[L]), n=B),
                "total_grad_norm": ScalarValue(value=float(mean[-1]), ci_low=low, ci_high=high, n=B),
                "total_update_ratio": ScalarValue(value=float(ratio[-1]), n=B),
                "total_snr": ScalarValue(value=float(snr[-1]), n=B)}
