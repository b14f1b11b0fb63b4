"""merging.task_vectors: how large each fine-tune's change is, where it sits, and how tasks align."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import torch

from tensorscope_core.plugin_api import (
    Cost,
    MetricResult,
    ModelSetMetric,
    ModelView,
    NoParams,
    RunShape,
    ScalarValue,
    TableValue,
)

from .flat import WorkBlock, pieces, work_entries
from .weights import Groups, check_compatible, members, number, parameters


def _cosine(dot: float, sq_a: float, sq_b: float) -> float:
    """Cosine of two vectors from their inner product and squared norms; NaN when one is zero."""
    denom = math.sqrt(sq_a * sq_b)
    return dot / denom if denom > 0 else math.nan


class TaskVectors(ModelSetMetric):
    """Task vectors ``tau_t = theta_t - theta_base`` (Ilharco et al., ICLR 2023) of each fine-tune.

    Per layer (block 0..L-1, then ``outside``: embeddings, final norm, head; a tied tensor counts
    once) the norm of each task vector and the share of each layer in the task's squared norm
    (``||tau_l||^2 / ||tau||^2``: the shares sum to 1), and the cosine similarity of every pair of
    tasks per layer and over all parameters. A cosine with a zero task vector is NaN (null).
    All of it comes from the tasks' inner products per layer, summed a slice of every task vector at
    a time (float64): nothing model-sized is held, whatever the number of fine-tunes.
    Needs a base model (``base=`` / ``--base``) and at least one fine-tune.
    """

    name = "merging.task_vectors"
    version = "1"
    summary = "task-vector norms per layer, layer shares and pairwise task cosines (base + fine-tunes)"
    needs_base = True
    Params = NoParams
    fields = {
        "norm/<task>": "per layer ||theta_task - theta_base||_2 (last entry: outside the blocks)",
        "total_norm/<task>": "||theta_task - theta_base||_2 over all parameters",
        "share/<task>": "per layer share of the task's squared change, ||tau_l||^2 / ||tau||^2",
        "layer_cosine/<a>/<b>": "per layer cosine similarity of the task vectors of a and b",
        "cosine/<a>/<b>": "cosine similarity of the task vectors of a and b over all parameters",
        "cosine_matrix": "table of the overall cosines between every pair of tasks",
    }

    @classmethod
    def cost(cls, params: Any, view: ModelView, shape: RunShape) -> Cost:
        """The float64 working block the task vectors are written into a slice at a time (``work``:
        ``flat.WORK_ENTRIES`` entries), whatever the number of fine-tunes; the per-layer Gram
        matrices of the tasks are a few numbers."""
        return Cost(state_bytes=8 * work_entries(view), flops=float(3 * view.n_params))

    @classmethod
    def set_skip_reason(cls, params: Any, views: Mapping[str, ModelView], base_name: str | None) -> str | None:
        if not members(views, base_name):
            return "needs at least one fine-tune beside the base: analyze({'math': ft}, base=base_model)"
        return None

    def setup(self) -> None:
        #: the working block: every task's slice of the task vectors, float64 (see ``cost``)
        self.work = torch.zeros(0)

    def compute_set(self, views: Mapping[str, ModelView],
                    results: Mapping[str, Mapping[str, MetricResult]]) -> dict[str, Any]:
        assert self.base_name is not None
        check_compatible(views)
        names = members(views, self.base_name)
        gram = self._gram(views, names)
        squares = {task: gram[:, i, i] for i, task in enumerate(names)}
        groups = Groups.of_view(views[self.base_name])
        out: dict[str, Any] = {}
        for task, sq in squares.items():
            total = float(sq.sum())
            out[f"norm/{task}"] = groups.layer_value(sq.sqrt())
            out[f"total_norm/{task}"] = ScalarValue(value=math.sqrt(total))
            out[f"share/{task}"] = groups.layer_value(sq / total if total > 0 else torch.full_like(sq, math.nan))
        matrix = {(a, a): 1.0 if float(squares[a].sum()) > 0 else math.nan for a in names}
        for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
            dots = gram[:, i, j]
            layer = [_cosine(float(d), float(x), float(y)) for d, x, y in zip(dots, squares[a], squares[b],
                                                                              strict=True)]
            overall = _cosine(float(dots.sum()), float(squares[a].sum()), float(squares[b].sum()))
            out[f"layer_cosine/{a}/{b}"] = groups.layer_value(layer)
            out[f"cosine/{a}/{b}"] = ScalarValue(value=number(overall))
            matrix[(a, b)] = matrix[(b, a)] = overall
        out["cosine_matrix"] = TableValue(columns=["task", *names], rows=[
            [a, *[number(matrix[(a, b)]) for b in names]] for a in names])
        return out

    def _gram(self, views: Mapping[str, ModelView], names: list[str]) -> torch.Tensor:
        """[groups, tasks, tasks] float64: the inner products of every pair of task vectors per layer
        group (squared norms on the diagonal), one slice of all task vectors at a time."""
        assert self.base_name is not None
        groups = Groups.of_view(views[self.base_name])
        base = parameters(views[self.base_name])
        thetas = [parameters(views[m]) for m in names]  # the members' own tensors
        block = WorkBlock(len(names), work_entries(views[self.base_name]), torch.float64,
                          next(iter(base.values())).device)
        self.work = block.data
        gram = torch.zeros(len(groups.labels), len(names), len(names), dtype=torch.float64)
        for piece in pieces(base, block.width):
            vectors = block.differences(piece, thetas, base)
            gram[groups.of[piece.name]] += (vectors @ vectors.T).cpu()
        return gram
