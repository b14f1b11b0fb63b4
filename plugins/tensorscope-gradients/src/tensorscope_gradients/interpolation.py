"""TracIn between checkpoints: per-example gradients at weights interpolated linearly between two
consecutive checkpoints, theta(t) = (1 - t) theta_i + t theta_{i+1}, on one extra copy of the model
rewritten in place for each point (so the run holds one model more, whatever the number of points)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from tensorscope_core.plugin_api import (
    Batch,
    CountSketch,
    LossTargets,
    ModelView,
    NotApplicable,
    PreparedData,
    RunShape,
    model_view,
    per_example_calls,
    per_example_grads,
    row_squares,
)

from .selection import layout_of, select_parameters

#: the run's loss targets of a batch (on a member's view: its tokenizer's mask token for masked LMs)
TargetsOf = Callable[[Batch], LossTargets]


def path_tasks(shape: RunShape, train: str, test: str) -> tuple[str | None, str | None]:
    """The (training, test) tasks whose batches a checkpoint's ``gradients.tracin_terms`` sees, as a
    model-set cost can tell from the run's batches: ``train`` and ``test`` (the terms' defaults) when
    the run has both, else its two largest tasks (the largest train x test product any two give)."""
    rows: dict[str | None, int] = {}
    for n, _, task in shape.batches:
        rows[task] = rows.get(task, 0) + n
    if train in rows and test in rows:
        return train, test
    largest = sorted(rows, key=lambda t: -rows[t])[:2] + [None, None]
    return largest[0], largest[1]


def point_calls(view: ModelView, shape: RunShape, tasks: Sequence[str | None]) -> int:
    """Calls of the model one interpolation point makes: a per-example backward of every batch of
    the two tasks (``per_example_calls``: one vmapped call, or one per example for encoders)."""
    return sum(per_example_calls(view, rows) for rows, _, task in shape.batches if task in tasks)


def copy_bytes(view: ModelView) -> int:
    """Bytes of one copy of the model: its parameters and buffers (from shapes: meta models too)."""
    return sum(t.numel() * t.element_size() for t in (*view.model.parameters(), *view.model.buffers()))


def _summed_nll(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One example's summed token NLL over its targets, as the core's ``per_example_grads`` artifact."""
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    return (ce * mask.to(ce.dtype)).sum().reshape(1)


class PathGradients:
    """The per-example gradients (of each example's mean token loss) at interpolated weights, on the
    parameters and with the projection of the checkpoints' ``gradients.tracin_terms`` (its
    ``params``), so that interior points and checkpoints give comparable terms.

    State: ``weights``, the copy's parameters and buffers (one model), and ``test_rows``, the test
    examples' gradients at the current point, float64 [n_test, width].
    """

    def __init__(self, first: ModelView, terms_params: Mapping[str, Any], seed: int) -> None:
        if terms_params.get("mask_metric") is not None:
            raise NotApplicable(f"interpolation_points needs the checkpoints' gradients.tracin_terms on parameters "
                                f"chosen by name or block: its mask_metric {terms_params['mask_metric']!r} may "
                                "select other entries at every checkpoint",
                                "drop mask_metric from gradients.tracin_terms, or set interpolation_points=0")
        self.train_task, self.test_task = str(terms_params["train_task"]), str(terms_params["test_task"])
        self.names = select_parameters(first, terms_params.get("parameters"), terms_params.get("layers"))
        k = terms_params.get("projection_dim")
        self.sketch = CountSketch(layout_of(first, self.names).size, int(k), seed) if k else None
        self.model = copy.deepcopy(first.model)  # the one extra copy, rewritten for every point
        self.weights = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        self.test_rows = torch.zeros(0, dtype=torch.float64)

    @contextmanager
    def view(self) -> Iterator[ModelView]:
        with model_view(self.model) as view:
            yield view

    def move_to(self, start: ModelView, end: ModelView, t: float) -> None:
        """Write theta(t) = theta_start + t (theta_end - theta_start) into the copy, in place."""
        a, b = dict(start.model.named_parameters()), dict(end.model.named_parameters())
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                if name not in a or name not in b or a[name].shape != p.shape or b[name].shape != p.shape:
                    raise ValueError(f"checkpoints {start.name} and {end.name} differ in parameter {name!r}: "
                                     "interpolation needs checkpoints of one architecture")
                torch.lerp(a[name].to(p.device, p.dtype), b[name].to(p.device, p.dtype), t, out=p.data)

    def _rows(self, view: ModelView, batch: Batch, targets: LossTargets) -> tuple[torch.Tensor, torch.Tensor]:
        """(the kept rows, float64 on the CPU, projected when asked; their exact squared norms)."""
        (flat,), _ = per_example_grads(view, self.names, _summed_nll, targets.model_input, batch.attention_mask,
                                       targets.target_ids, targets.target_mask)
        rows = flat / targets.target_mask.sum(dim=1).clamp(min=1).to(device=flat.device, dtype=flat.dtype)[:, None]
        squares = row_squares(rows.cpu())
        exact = rows.double().cpu()
        return (self.sketch(exact) if self.sketch is not None else exact), squares

    def terms(self, view: ModelView, data: PreparedData,
              targets_of: TargetsOf) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """At the copy's current weights: (g(z) . g(z') [n_train, n_test], ||g(z)||^2, ||g(z')||^2) in
        float64, the examples in the order the terms saw them (the tasks' batches in data order).
        The test rows are kept; each training batch is multiplied with them and dropped."""
        device = next(self.model.parameters()).device
        test, test_self = [], []
        for batch in data.batches():
            if batch.task == self.test_task:
                batch = batch.to(str(device))
                rows, squares = self._rows(view, batch, targets_of(batch))
                test.append(rows)
                test_self.append(squares)
        self.test_rows = torch.zeros(0, dtype=torch.float64)  # the last point's rows make way
        self.test_rows = torch.cat(test)
        dots, train_self = [], []
        for batch in data.batches():
            if batch.task == self.train_task:
                batch = batch.to(str(device))
                rows, squares = self._rows(view, batch, targets_of(batch))
                dots.append(rows @ self.test_rows.T)
                train_self.append(squares)
        return torch.cat(dots), torch.cat(train_self), torch.cat(test_self)
