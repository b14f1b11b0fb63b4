"""basic.grad_norms: per-layer parameter-gradient norms of the batch-mean loss."""

from __future__ import annotations

import torch

from tensorscope_core.plugin_api import (
    Cost,
    LayerValue,
    Metric,
    ModelView,
    NoParams,
    RunShape,
    ScalarValue,
    Step,
    bootstrap_ratio_ci,
    sum_of_squares,
)


class GradNorms(Metric):
    """For each batch, the L2 norm of the loss gradient over the parameters of each block
    (sqrt of the sum of squared entries), of the parameters outside all blocks, and in
    total; reported as the mean over batches, the outside and total norms with a
    bootstrap CI over batches and the per-batch norms as their ``samples``.
    The loss is the batch's mean token cross-entropy, as in ``basic.loss``.
    """

    name = "basic.grad_norms"
    supports_dispatch = True  # the shared param_grad, which holds a dispatched model's offloaded weights' too
    version = "2"
    summary = "per-layer parameter gradient norms (mean over batches)"
    Params = NoParams
    artifacts = ("param_grad",)
    fields = {"layer_norm": "mean over batches of the block's gradient norm",
              "outside_norm": "the same for parameters outside the blocks (embeddings, final norm, head), "
                              "CI over batches",
              "total_norm": "mean over batches of the global gradient norm, CI over batches"}

    def setup(self) -> None:
        self.layer_of = self.view.layer_of_parameter()
        self.per_batch = torch.zeros(self.shape.n_batches, self.view.n_layers + 2, dtype=torch.float64)
        self.seen = 0

    @classmethod
    def cost(cls, params: NoParams, view: ModelView, shape: RunShape) -> Cost:
        return Cost(state_bytes=8 * shape.n_batches * (view.n_layers + 2))

    def update(self, step: Step) -> None:
        squares = torch.zeros(self.view.n_layers + 1, dtype=torch.float64)
        for name, grad in step["param_grad"].items():
            layer = self.layer_of.get(name)
            index = self.view.n_layers if layer is None else layer
            squares[index] += sum_of_squares(grad).cpu()
        self.per_batch[self.seen, :-1] = squares.sqrt()
        self.per_batch[self.seen, -1] = squares.sum().sqrt()
        self.seen += 1

    def finalize(self) -> dict[str, object]:
        done = self.per_batch[:self.seen]
        mean = done.mean(dim=0)
        out: dict[str, object] = {"layer_norm": LayerValue(values=mean[:-2].tolist(), axis="block")}
        for field, column in (("outside_norm", -2), ("total_norm", -1)):
            per_batch = done[:, column].tolist()
            low, high = bootstrap_ratio_ci(per_batch, [1.0] * len(per_batch), seed=self.shape.seed)
            out[field] = ScalarValue(value=float(mean[column]), ci_low=low, ci_high=high, n=self.seen,
                                     samples=per_batch)
        return out
