"""circuits.qkov_interference: which heads the tasks fight over, from per-task grouped Fisher."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    HeadValue,
    Metric,
    MetricResult,
    ModelView,
    NotApplicable,
    Params,
    PreparedData,
    RunShape,
    TableValue,
)

PARTS = ("qk", "ov")


@dataclass(frozen=True)
class Interference:
    """Per head: each task's share of its total importance, and the overlap of the shares."""

    shares: dict[str, np.ndarray]  # task -> [L, H], each summing to 1
    overlap: np.ndarray  # [L, H]: mean over task pairs of min(share_s, share_t)
    important: dict[str, np.ndarray]  # task -> [L, H] bool: share >= ratio / n_heads


def interference(importance: Mapping[str, np.ndarray], importance_ratio: float) -> Interference:
    """Shares s_t(h) = I_t(h) / sum_h' I_t(h') (so tasks with different Fisher scales compare),
    overlap(h) = mean over task pairs (s, t) of min(s_s(h), s_t(h)); summed over heads it is the
    mean pairwise histogram intersection of the tasks' shares, 1 for identical, 0 for disjoint.
    A head is important to a task when its share is >= importance_ratio / (number of heads)."""
    if len(importance) < 2:
        raise ValueError(f"interference needs at least two tasks, got {list(importance)}")
    shares = {}
    for task, values in importance.items():
        total = float(np.nansum(values))
        if not total > 0:
            raise ValueError(f"task '{task}' has no positive Fisher importance on any head")
        shares[task] = np.nan_to_num(np.asarray(values, dtype=np.float64)) / total
    pairs = [np.minimum(shares[a], shares[b]) for a, b in itertools.combinations(shares, 2)]
    n_heads = next(iter(shares.values())).size
    return Interference(shares, np.mean(pairs, axis=0),
                        {t: s >= importance_ratio / n_heads for t, s in shares.items()})


class InterferenceParams(Params):
    fisher: Literal["true", "empirical"] = Field("true", description="which Fisher of fisher.grouped to read")
    importance_ratio: float = Field(2.0, gt=0, description="a head is important to a task when its share of "
                                    "the task's importance is >= importance_ratio / number of heads")
    top: int = Field(10, ge=1, description="rows of the ranking")


class QKOVInterference(Metric):
    """Which heads the tasks fight over. Reads ``fisher.grouped`` per task (fields
    ``<fisher>/<task>/head_qk`` and ``<fisher>/<task>/head_ov``: the summed Fisher diagonal of
    each query head's W_Q, W_K parameters and of its W_V, W_O parameters). For each part (QK,
    OV) separately, task t's importance I_t(h) of head h becomes its share
    s_t(h) = I_t(h) / sum_h' I_t(h'), and

    - ``overlap_qk``/``overlap_ov``(h) = mean over task pairs of min(s_a(h), s_b(h)): the
      importance mass both tasks put on the head (high: both rely on it, so fine-tuning for one
      moves parameters the other needs);
    - ``task_overlap_qk``/``_ov`` = sum over heads of that, in [0, 1] (1: the tasks rank every
      head alike; 0: they use disjoint heads);
    - ``ranking``: the ``top`` (head, part) pairs by overlap, with every task's share;
    - ``exclusive``: heads important (share >= importance_ratio / number of heads) to exactly
      one task, per part.

    Needs named tasks: with fewer than two the metric is skipped.
    """

    name = "circuits.qkov_interference"
    supports_dispatch = True  # reads its needed metrics' results only
    version = "1"
    summary = "per-head Fisher overlap of the tasks on QK and OV parameters: contested and task-exclusive heads"
    Params = InterferenceParams
    requires_metrics = ("fisher.grouped",)
    derived_from = ("fisher.grouped",)
    fields = {
        "overlap_qk": "layer x head mean pairwise min of the tasks' QK importance shares",
        "overlap_ov": "layer x head mean pairwise min of the tasks' OV importance shares",
        "task_overlap_qk": "sum of overlap_qk over heads, in [0, 1]",
        "task_overlap_ov": "sum of overlap_ov over heads, in [0, 1]",
        "ranking": "table: layer, head, part, overlap, share per task; most contested first",
        "exclusive": "table: layer, head, part, task, share of heads important to one task only",
    }

    @classmethod
    def skip_reason(cls, params: InterferenceParams, view: ModelView, data: PreparedData | None) -> str | None:
        tasks = data.tasks if data is not None else []
        if len(tasks) < 2:
            return (f"needs at least two named tasks, the run has {len(tasks)}: pass data as "
                    "{'task_a': ..., 'task_b': ...}")
        return None

    @classmethod
    def cost(cls, params: InterferenceParams, view: ModelView, shape: RunShape) -> Cost:
        return Cost(state_bytes=0, flops=float(len(shape.tasks) ** 2 * view.n_layers * view.n_heads))

    def _importance(self, part: str) -> dict[str, np.ndarray]:
        result: MetricResult = self.deps["fisher.grouped"]
        out = {}
        for task in self.shape.tasks:
            field = f"{self.params.fisher}/{task}/head_{part}"
            value = result.values.get(field)
            if isinstance(value, HeadValue):
                out[task] = np.array(value.values, dtype=np.float64)
            elif value is not None:
                out[task] = self.tensor_of(result, field).double().numpy()
            else:
                raise NotApplicable(
                    f"fisher.grouped has no field '{field}' (fields: {sorted(result.values)[:8]} ...): per-task head "
                    "importances come from fisher.diagonal's per-task fields, which its 'pooled' memory rung drops",
                    "raise --memory-budget, or pin fisher.diagonal's rung: --rung fisher.diagonal=asked")
        return out

    def finalize(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        ranking: list[list[Any]] = []
        exclusive: list[list[Any]] = []
        tasks = list(self.shape.tasks)
        for part in PARTS:
            found = interference(self._importance(part), self.params.importance_ratio)
            out[f"overlap_{part}"] = HeadValue(values=found.overlap.tolist())
            out[f"task_overlap_{part}"] = float(found.overlap.sum())
            for (i, j), value in np.ndenumerate(found.overlap):
                layer, head = int(i), int(j)
                ranking.append([layer, head, part, float(value)]
                               + [float(found.shares[t][layer, head]) for t in tasks])
                owners = [t for t in tasks if found.important[t][layer, head]]
                if len(owners) == 1:
                    exclusive.append([layer, head, part, owners[0], float(found.shares[owners[0]][layer, head])])
        ranking.sort(key=lambda r: -r[3])
        out["ranking"] = TableValue(columns=["layer", "head", "part", "overlap"] + [f"share/{t}" for t in tasks],
                                    rows=ranking[:self.params.top])
        out["exclusive"] = TableValue(columns=["layer", "head", "part", "task", "share"],
                                      rows=sorted(exclusive, key=lambda r: -r[4]))
        return out
