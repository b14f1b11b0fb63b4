"""Loss and accuracy of a model under substituted weights (a merge, a point on a path) on the run's data.

The weights are swapped in by ``tensorscope_core.plugin_api.batch_logits`` (``functional_call``
on the core's hook-free copy of the module), so no member's module is modified. Targets are
the run's (a model-set metric's ``self.loss_targets``: next token for causal models, the seeded
masked tokens for masked LMs), so the numbers match ``basic.loss`` on the members themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from tensorscope_core.plugin_api import (
    Batch,
    LossTargets,
    ModelView,
    PreparedData,
    ScalarValue,
    TableValue,
    batch_logits,
)

from .weights import number

POOLED = None  # the key of the score over all of the run's data

#: the run's loss targets of a batch on a model: a model-set metric's ``self.loss_targets``
TargetsFn = Callable[[ModelView, Batch], LossTargets]


@dataclass(frozen=True)
class Score:
    """Token-mean cross-entropy (nats) and top-1 accuracy over the target tokens of some batches."""

    loss: float
    accuracy: float
    n_targets: int


def batch_scores(view: ModelView, weights: Mapping[str, torch.Tensor] | None, batch: Batch,
                 targets_of: TargetsFn) -> tuple[float, int, int]:
    """(summed target cross-entropy, correct top-1 predictions, number of targets) of one batch.

    ``weights`` replace the parameters of those names (``tensorscope_core.plugin_api.batch_logits``);
    ``targets_of`` gives the run's loss targets of the batch (a model-set metric's ``self.loss_targets``).
    """
    device = next(view.model.parameters()).device
    batch = batch.to(str(device))
    targets = targets_of(view, batch)
    with torch.no_grad():
        logits = batch_logits(view, batch, targets, weights)
    mask = targets.target_mask.bool()
    # in the run's dtype, as the core's token loss (``batch_logits`` already upcasts half precision to
    # float32): a float32 cross-entropy in a float64 run is ~1e-7 off ``basic.loss``
    chosen, labels = logits[mask], targets.target_ids[mask]
    loss = torch.nn.functional.cross_entropy(chosen, labels, reduction="sum")
    return float(loss), int((chosen.argmax(dim=-1) == labels).sum()), int(mask.sum())


def task_batches(data: PreparedData) -> Iterator[tuple[str | None, Batch]]:
    for batch in data.batches():
        yield batch.task, batch


def evaluate(view: ModelView, weights: Mapping[str, torch.Tensor] | None, data: PreparedData,
             targets_of: TargetsFn) -> dict[str | None, Score]:
    """Score per task (key None: all of the data; the only key for untasked data)."""
    sums: dict[str | None, list[float]] = {}
    for task, batch in task_batches(data):
        loss, correct, n = batch_scores(view, weights, batch, targets_of)
        for key in {task, POOLED}:
            acc = sums.setdefault(key, [0.0, 0.0, 0])
            acc[0] += loss
            acc[1] += correct
            acc[2] += n
    return {k: Score(s[0] / s[2] if s[2] else float("nan"), s[1] / s[2] if s[2] else float("nan"), int(s[2]))
            for k, s in sums.items()}


def score_fields(label: str, scores: Mapping[str | None, Score], prefix: str = "") -> dict[str, ScalarValue]:
    """``<prefix>loss/<label>`` (all data) and ``<prefix>loss/<label>/<task>`` per task; the same
    with ``accuracy``."""
    out: dict[str, ScalarValue] = {}
    for task, score in scores.items():
        suffix = "" if task is None else f"/{task}"
        out[f"{prefix}loss/{label}{suffix}"] = ScalarValue(value=number(score.loss), n=score.n_targets, unit="nats")
        out[f"{prefix}accuracy/{label}{suffix}"] = ScalarValue(value=number(score.accuracy), n=score.n_targets)
    return out


def loss_skip_reason(views: Mapping[str, ModelView]) -> str | None:
    """Why the members' loss cannot be evaluated (a masked LM saved without its mask token), or None."""
    for name, view in views.items():
        if not view.causal and view.mask_token_id is None:
            return (f"{name} is a masked LM without a mask token, so its loss is undefined: save the tokenizer "
                    "with the model, or turn the loss evaluation off")
    return None


def score_table(rows: Mapping[str, Mapping[str | None, Score]]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of a loss table: one row per model or merge, one column per task (then ``all``)."""
    tasks = [t for t in next(iter(rows.values())) if t is not None]
    columns = ["model", *[f"loss {t}" for t in tasks], "loss all"]
    table = [[label, *[number(scores[t].loss) for t in tasks], number(scores[POOLED].loss)]
             for label, scores in rows.items()]
    return columns, table


#: makes a merge's weights when it is evaluated (so that only one merge is held at a time)
MergeFn = Callable[[], Mapping[str, torch.Tensor]]


def compare_merges(views: Mapping[str, ModelView], host: ModelView, merges: Mapping[str, MergeFn],
                   data: PreparedData, targets_of: TargetsFn) -> dict[str, Any]:
    """Every member's score on ``data`` beside each merge's (its weights, made by ``merges[label]()``
    when its turn comes, run in ``host``'s module).

    Fields ``loss/<member>[/<task>]``, ``merged_loss/<merge>[/<task>]`` (and ``accuracy``), and a
    ``losses`` table with one row per member and merge.
    """
    rows: dict[str, dict[str | None, Score]] = {}
    out: dict[str, Any] = {}
    for name, view in views.items():
        rows[name] = evaluate(view, None, data, targets_of)
        out.update(score_fields(name, rows[name]))
    for label, make in merges.items():
        rows[f"{label} (merge)"] = scores = evaluate(host, make(), data, targets_of)
        out.update(score_fields(label, scores, prefix="merged_"))
    columns, table = score_table(rows)
    out["losses"] = TableValue(columns=columns, rows=table)
    return out
