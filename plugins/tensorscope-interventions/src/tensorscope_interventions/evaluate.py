"""The token-mean loss of a model's module under substituted weights, on the run's batches.

Weights are swapped in by ``batch_logits`` (``functional_call`` on the core's hook-free copy), so no
member's module changes and the capture never sees these forwards. Batches without a loss target
are not run (``has_loss_target`` counts the same batches for the declared passes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from tensorscope_core.plugin_api import Batch, LossTargets, ModelView, PreparedData, batch_logits

#: the run's loss targets of a batch on a member: a model-set metric's ``self.loss_targets``
TargetsFn = Callable[[ModelView, Batch], LossTargets]


def data_loss(
    view: ModelView, weights: Mapping[str, torch.Tensor] | None, data: PreparedData, targets_of: TargetsFn
) -> float:
    """Summed target cross-entropy over every batch divided by the number of targets (nats), computed in
    the logits' dtype as the core's token loss, so at the model's own weights it is ``basic.loss``."""
    device = str(next(view.model.parameters()).device)
    total, count = 0.0, 0
    for batch in data.batches():
        batch = batch.to(device)
        targets = targets_of(view, batch)
        if targets.n_targets == 0:
            continue
        with torch.no_grad():
            logits = batch_logits(view, batch, targets, weights)
        mask = targets.target_mask.bool()
        total += float(torch.nn.functional.cross_entropy(logits[mask], targets.target_ids[mask], reduction="sum"))
        count += int(mask.sum())
    return total / count if count else float("nan")
