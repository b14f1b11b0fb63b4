"""basic.weight_norms: Frobenius norms of the weights per block (no data needed)."""

from __future__ import annotations

import torch

from tensorscope_core.plugin_api import LayerValue, Metric, NoParams, ScalarValue, float64_sum_of_squares


class WeightNorms(Metric):
    """sqrt(sum of squared entries) of all parameters of each block, of the parameters
    outside the blocks, and of all parameters. Tied parameters count once."""

    name = "basic.weight_norms"
    supports_dispatch = True  # reads the weights through view.named_weights (loaded when offloaded)
    version = "1"
    summary = "per-layer Frobenius norm of the weights (no data)"
    Params = NoParams
    artifacts = ("weights",)
    fields = {"layer_norm": "norm of each block's parameters", "outside_norm": "norm outside the blocks",
              "total_norm": "norm of all parameters"}

    def finalize(self) -> dict[str, object]:
        layer_of = self.view.layer_of_parameter()
        squares = torch.zeros(self.view.n_layers + 1, dtype=torch.float64)
        for name, p in self.view.named_weights():  # tied duplicates once; offloaded ones loaded
            layer = layer_of[name]
            index = self.view.n_layers if layer is None else layer
            squares[index] += float64_sum_of_squares(p).cpu()
        return {"layer_norm": LayerValue(values=squares[:-1].sqrt().tolist(), axis="block"),
                "outside_norm": ScalarValue(value=float(squares[-1].sqrt())),
                "total_norm": ScalarValue(value=float(squares.sum().sqrt()))}
