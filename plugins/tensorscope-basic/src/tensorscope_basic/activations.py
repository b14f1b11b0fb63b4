"""basic.activation_stats: residual-stream norms per layer and the MLP dead-unit fraction."""

from __future__ import annotations

import torch
from pydantic import Field

from tensorscope_core.plugin_api import Cost, LayerValue, Metric, ModelView, Params, RunShape, Step


class ActivationParams(Params):
    dead_threshold: float = Field(0.0, ge=0.0, description="a unit is dead when |activation| <= this on every token")


class ActivationStats(Metric):
    """Per layer: the mean L2 norm of the residual stream over real (unpadded) tokens, and
    the fraction of MLP hidden units that are dead (|h| <= dead_threshold on every real
    token of the data; h is the input of the MLP output projection).

    ``resid_norm`` has n_layers + 1 entries: entry l enters block l, the last leaves the
    final block (before the final norm).
    """

    name = "basic.activation_stats"
    supports_dispatch = True  # reads the shared pass's activations / outputs only
    version = "1"
    summary = "per-layer residual norms and MLP dead-unit fraction"
    Params = ActivationParams
    artifacts = ("resid", "mlp_hidden")
    fields = {"resid_norm": "mean ||resid||_2 per token, n_layers+1 entries",
              "dead_fraction": "fraction of MLP units never above the threshold, per layer"}

    def setup(self) -> None:
        self.norm_sum = torch.zeros(self.view.n_layers + 1, dtype=torch.float64)
        self.tokens = torch.zeros((), dtype=torch.float64)
        self.peak = torch.zeros(self.view.n_layers, self.view.d_mlp, dtype=torch.float32)

    @classmethod
    def cost(cls, params: ActivationParams, view: ModelView, shape: RunShape) -> Cost:
        return Cost(state_bytes=8 * (view.n_layers + 2) + 4 * view.n_layers * view.d_mlp)

    def update(self, step: Step) -> None:
        real = step.batch.attention_mask.bool()
        for layer, resid in enumerate(step["resid"]):
            self.norm_sum[layer] += resid[real].double().norm(dim=-1).sum().cpu()
        self.tokens += real.sum().cpu()
        for layer, hidden in enumerate(step["mlp_hidden"]):
            peak = hidden[real].abs().amax(dim=0).float().cpu()
            self.peak[layer] = torch.maximum(self.peak[layer], peak)

    def finalize(self) -> dict[str, LayerValue]:
        dead = (self.peak <= self.params.dead_threshold).double().mean(dim=1)
        return {"resid_norm": LayerValue(values=(self.norm_sum / self.tokens).tolist(), axis="resid"),
                "dead_fraction": LayerValue(values=dead.tolist(), axis="block")}
