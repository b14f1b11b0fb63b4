"""basic.grad_norms: per-layer parameter-gradient norms of the batch-mean loss."""

from __future__ import annotations

import torch

from tensorscope_core import Cost, LayerValue, Metric, ModelView, NoParams, RunShape, ScalarValue, Step
from tensorscope_core.stats import bootstrap_ratio_ci


class GradNorms(Metric):
    """For each batch, the L2 norm of the loss gradient over the parameters of each block
    (sqrt of the sum of squared entries), of the parameters outside all blocks, and in
    total; reported as the mean over batches, the total with a bootstrap CI over batches.
    The loss is the batch's mean token cross-entropy, as in ``basic.loss``.
    """

    name = "basic.grad_norms"
    version = "1"
    summary = "per-layer parameter gradient norms (mean over batches)"
    Params = NoParams
    artifacts = ("param_grad",)
    fields = {"layer_norm": "mean over batches of the block's gradient norm",
              "outside_norm": "the same for parameters outside the blocks (embeddings, final norm, head)",
              "total_norm": "mean over batches of the global gradient norm, CI over batches"}

    def setup(self) -> None:
        assert self.view is not None
        self.layer_of = self.view.layer_of_parameter()
        self.per_batch = torch.zeros(self.shape.n_batches, self.view.n_layers + 2, dtype=torch.float64)
        self.seen = 0

    @classmethod
    def cost(cls, params: NoParams, view: ModelView, shape: RunShape) -> Cost:
        return Cost(state_bytes=8 * shape.n_batches * (view.n_layers + 2))

    def update(self, step: Step) -> None:
        assert self.view is not None
        squares = torch.zeros(self.view.n_layers + 1, dtype=torch.float64)
        for name, grad in step["param_grad"].items():
            layer = self.layer_of.get(name)
            index = self.view.n_layers if layer is None else layer
            # vector_norm accumulates in float64 without materialising a float64 copy of the gradient
            squares[index] += torch.linalg.vector_norm(grad, dtype=torch.float64).square().cpu()
        self.per_batch[self.seen, :-1] = squares.sqrt()
        self.per_batch[self.seen, -1] = squares.sum().sqrt()
        self.seen += 1

    def finalize(self) -> dict[str, object]:
        done = self.per_batch[:self.seen]
        mean = done.mean(dim=0)
        total = done[:, -1].tolist()
        low, high = bootstrap_ratio_ci(total, [1.0] * len(total), seed=self.shape.seed)
        return {"layer_norm": LayerValue(values=mean[:-2].tolist()),
                "outside_norm": ScalarValue(value=float(mean[-2]), n=self.seen),
                "total_norm": ScalarValue(value=float(mean[-1]), ci_low=low, ci_high=high, n=self.seen)}
