"""dynamics.task_accuracy: top-1 accuracy on the run's loss targets, overall and per named task
(what dynamics.grokking reads when the train / held-out curves come from the run's own tasks)."""

from __future__ import annotations

import torch

from tensorscope_core.plugin_api import (
    Cost,
    Metric,
    ModelView,
    NoParams,
    RunShape,
    ScalarValue,
    Step,
    bootstrap_ratio_ci,
)


class TaskAccuracy(Metric):
    """Fraction of the run's loss targets (``step.targets``: next tokens of a causal model, the
    masked tokens of a masked LM) whose target is the arg-max of the logits, over all targets
    (``accuracy``) and per named task (``accuracy/<task>``). The CI is a bootstrap over
    sequences of the ratio of sums; ``samples`` hold each sequence's accuracy, in data order.
    """

    name = "dynamics.task_accuracy"
    supports_dispatch = True  # reads the shared pass's logits only
    version = "1"
    summary = "top-1 accuracy on the loss targets, overall and per named task"
    artifacts = ("logits",)
    fields = {"accuracy": "fraction of targets predicted top-1", "accuracy/<task>": "the same per named task"}

    @classmethod
    def cost(cls, params: NoParams, view: ModelView, shape: RunShape) -> Cost:
        return Cost(state_bytes=2 * 8 * shape.n_sequences)

    def setup(self) -> None:
        n = self.shape.n_sequences
        self.correct = torch.zeros(n, dtype=torch.float64)
        self.targets = torch.zeros(n, dtype=torch.float64)
        self.task_of: list[str | None] = []
        self.filled = 0

    def update(self, step: Step) -> None:
        mask = step.targets.target_mask.bool()
        hit = (step["logits"].argmax(-1) == step.targets.target_ids) & mask
        rows = mask.shape[0]
        self.correct[self.filled : self.filled + rows] = hit.sum(1).double().cpu()
        self.targets[self.filled : self.filled + rows] = mask.sum(1).double().cpu()
        self.task_of += [step.task] * rows
        self.filled += rows

    def _scalar(self, keep: torch.Tensor) -> ScalarValue:
        num, den = self.correct[keep], self.targets[keep]
        low, high = bootstrap_ratio_ci(num.tolist(), den.tolist(), seed=self.shape.seed)
        return ScalarValue(
            value=float(num.sum() / den.sum()), ci_low=low, ci_high=high, n=int(den.sum()), samples=(num / den).tolist()
        )

    def finalize(self) -> dict[str, ScalarValue]:
        used = torch.zeros(len(self.targets), dtype=torch.bool)
        used[: self.filled] = self.targets[: self.filled] > 0
        if not bool(used.any()):
            raise ValueError("no loss targets in the data: accuracy is undefined")
        out = {"accuracy": self._scalar(used)}
        for task in sorted({t for t in self.task_of if t is not None}):
            keep = used.clone()
            keep[: self.filled] &= torch.tensor([t == task for t in self.task_of])
            if bool(keep.any()):
                out[f"accuracy/{task}"] = self._scalar(keep)
        return out
