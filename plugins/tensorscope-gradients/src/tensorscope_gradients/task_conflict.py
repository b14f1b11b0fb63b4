"""gradients.task_conflict: cosines between named tasks' gradients, PCGrad, batch-pair conflict."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
from pydantic import Field
from scipy import stats

from tensorscope_core.plugin_api import (
    Cost,
    GradientStore,
    LayerValue,
    ModelView,
    PreparedData,
    Rung,
    RunShape,
    ScalarValue,
    Step,
    StoreBacking,
    TableValue,
    tasks_skip_reason,
)

from .ladders import disk_rung
from .maths import pcgrad, quadratic_norm
from .selection import Layout, SubsetMetric, SubsetParams, layout_of, planned_size, select_parameters

N_RESAMPLES = 1000


class TaskConflictParams(SubsetParams):
    ci_level: float = Field(0.95, gt=0, lt=1, description="confidence level of the bootstrap CIs")
    backing: StoreBacking = Field("memory", description="where the batch gradients live: 'memory' or 'disk' (a "
                                                        "file in the run's scratch folder; the same values)")


def _fraction(cos: np.ndarray, groups: Sequence[np.ndarray]) -> float:
    """Fraction of cross-task batch pairs with cosine < 0 (pooled over task pairs)."""
    neg = total = 0
    for a, b in itertools.combinations(groups, 2):
        block = cos[np.ix_(a, b)]
        neg += int((block < 0).sum())
        total += block.size
    return neg / total if total else math.nan


def _bootstrap(cos: np.ndarray, groups: Sequence[np.ndarray], level: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap CI of the conflict fraction, resampling each task's batches."""
    if any(len(g) < 2 for g in groups):
        return math.nan, math.nan

    def statistic(*samples: np.ndarray) -> float:
        return _fraction(cos, [s.astype(int) for s in samples])

    res = stats.bootstrap(tuple(groups), statistic, vectorized=False, paired=False, confidence_level=level,
                          n_resamples=N_RESAMPLES, method="percentile", random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


class TaskConflict(SubsetMetric):
    """For named tasks A, B, ...: g_A is the mean over A's batches of the gradient of each
    batch's mean token loss (the core's ``param_grad``), optionally restricted to a parameter
    subset (``parameters`` glob patterns / ``layers`` block indices / the masked entries of a
    ``mask_metric``).

    - ``cosine``: cos(g_A, g_B) (the mean over task pairs with more than two tasks);
      ``layer_cosine``: the same per block, on the block's part of the gradients;
      ``layer_conflict``: per block, the fraction of task pairs whose cosine is < 0;
    - ``conflict_score``: the fraction of cross-task *batch* pairs (a in A, b in B) whose
      gradients have cosine < 0, with a percentile-bootstrap CI that resamples each task's
      batches with replacement (1000 resamples, seeded by the run's seed; NaN when a task
      has fewer than two batches);
    - PCGrad (Yu et al. 2020) on the task gradients, tasks visited in a seeded random
      order: for each task, ``relative_change`` = ||g^PC - g|| / ||g||, the cosine between
      g^PC and g and the number of projections; ``pcgrad_update_change`` the same for the
      summed update sum_i g_i^PC against sum_i g_i.

    Everything is computed from the per-block Gram matrices of the batch gradients (task means and
    PCGrad are combinations of them), so the gradients are read once, in blocks, from RAM or from
    disk (``backing``, the same values). Memory ladder: disk when the gradients fit there.
    """

    name = "gradients.task_conflict"
    supports_dispatch = True  # the shared param_grad, which holds a dispatched model's offloaded weights' too
    version = "1"
    summary = "cosines between named tasks' gradients per layer, PCGrad projection, batch-pair conflict with CI"
    Params = TaskConflictParams
    artifacts = ("param_grad",)
    fields = {"cosine": "cosine between the task gradients (mean over task pairs)",
              "conflict_score": "fraction of cross-task batch pairs with cosine < 0, bootstrap CI over batches",
              "layer_cosine": "per block: cosine between the task gradients (mean over task pairs)",
              "layer_conflict": "per block: fraction of task pairs with cosine < 0",
              "pairs": "table per task pair: cosine, conflict fraction with CI, number of batch pairs",
              "pcgrad": "table per task: relative change by PCGrad, cosine to the original, projections",
              "pcgrad_update_change": "||sum PCGrad gradients - sum gradients|| / ||sum gradients||"}

    @classmethod
    def skip_reason(cls, params: TaskConflictParams, view: ModelView, data: PreparedData | None) -> str | None:
        return tasks_skip_reason(data)

    def setup(self) -> None:
        chosen = self.subset()
        blocks = layout_of(self.view, chosen.names).by_block(self.view.n_layers, chosen.entries)
        self.layouts = [layout for layout, _ in blocks]
        self.entries = [entries for _, entries in blocks]
        self.stores = [GradientStore(_kept(layout, entries), backing=self.params.backing) for layout, entries in blocks]
        self.dtype = next(self.view.model.parameters()).dtype
        self.tasks: list[str] = []

    @classmethod
    def cost(cls, params: TaskConflictParams, view: ModelView, shape: RunShape) -> Cost:
        """One row per batch and block (``GradientStore.declared_bytes``) and the masks' entry indices."""
        index_bytes = planned_size(view, params)[1]
        try:
            layout = layout_of(view, select_parameters(view, params.parameters, params.layers))
        except ValueError:
            layout = layout_of(view, [])
        return Cost(state_bytes=sum(GradientStore.declared_bytes(shape.n_batches, block.size, "none",
                                                                 view.dtype_bytes, params.backing)
                                    for block, _ in layout.by_block(view.n_layers)) + index_bytes)

    @classmethod
    def ladder(cls, params: TaskConflictParams, view: ModelView, shape: RunShape) -> Sequence[Rung]:
        """Disk (exact) when the batch gradients fit in the scratch folder's free space."""
        size = planned_size(view, params)[0]
        disk = disk_rung(params, GradientStore.disk_bytes(shape.n_batches, size, "none", view.dtype_bytes))
        return [disk] if disk is not None else []

    def update(self, step: Step) -> None:
        assert step.task is not None
        for layout, entries, store in zip(self.layouts, self.entries, self.stores, strict=True):
            row = layout.flatten(step["param_grad"], self.dtype)
            store.add((row if entries is None else row[entries])[None])
        self.tasks.append(step.task)

    def finalize(self) -> dict[str, object]:
        L = self.view.n_layers
        grams = torch.stack([store.gram() for store in self.stores])  # [L + 1, B, B] per block
        for store in self.stores:
            store.close()
        gram = grams.sum(dim=0)
        tasks = list(dict.fromkeys(self.tasks))
        groups = [np.array([i for i, t in enumerate(self.tasks) if t == task]) for task in tasks]
        cos = _cosines(gram).numpy()
        mean_of = torch.zeros(len(tasks), len(self.tasks), dtype=torch.float64)  # task means = mean_of @ batches
        for t, g in enumerate(groups):
            mean_of[t, torch.as_tensor(g)] = 1.0 / len(g)
        block_means = mean_of @ grams @ mean_of.T  # [L + 1, T, T]: Gram matrices of the task means per block
        means = block_means.sum(dim=0)
        task_cos, layer_task_cos = _cosines(means), [_cosines(m) for m in block_means[:L]]
        seed, level = self.shape.seed, self.params.ci_level

        pair_rows: list[list[object]] = []
        pair_cos: list[float] = []
        pair_ci: list[tuple[float, float]] = []
        n_pairs = 0
        layer_cos = []
        for (i, a), (j, b) in itertools.combinations(enumerate(tasks), 2):
            frac = _fraction(cos, [groups[i], groups[j]])
            low, high = _bootstrap(cos, [groups[i], groups[j]], level, seed)
            n_ab = len(groups[i]) * len(groups[j])
            pair_cos.append(float(task_cos[i, j]))
            pair_ci.append((low, high))
            n_pairs += n_ab
            pair_rows.append([a, b, pair_cos[-1], frac, low, high, n_ab])
            layer_cos.append([float(c[i, j]) for c in layer_task_cos])
        per_layer = np.array(layer_cos, dtype=np.float64)  # [pairs, L]
        with np.errstate(invalid="ignore"):
            layer_mean = np.nanmean(per_layer, axis=0) if np.isfinite(per_layer).any() else per_layer[0]
        finite = np.isfinite(per_layer)
        layer_conflict = np.where(finite.any(axis=0), (per_layer < 0).sum(axis=0) / np.maximum(finite.sum(axis=0), 1),
                                  np.nan)
        pooled = _fraction(cos, groups)
        low, high = _bootstrap(cos, groups, level, seed) if len(tasks) > 2 else pair_ci[0]

        order = [int(k) for k in np.random.default_rng(seed).permutation(len(tasks))]
        coef, hit = pcgrad(means, order)  # g_i^PC = sum_t coef[i, t] g_t
        own = torch.eye(len(tasks), dtype=torch.float64)
        base = quadratic_norm(own, means)
        changes = _ratio(quadratic_norm(coef - own, means), base)
        to_original = _ratio((coef @ means).diagonal(), quadratic_norm(coef, means) * base)
        pc_rows = [[task, float(changes[i]), float(to_original[i]), int(hit[i].sum())] for i, task in enumerate(tasks)]
        total = torch.ones(len(tasks), dtype=torch.float64)
        update_change = float(_ratio(quadratic_norm(coef.sum(dim=0) - total, means), quadratic_norm(total, means)))
        return {"cosine": ScalarValue(value=float(np.mean(pair_cos)), n=len(pair_cos)),
                "conflict_score": ScalarValue(value=pooled, ci_low=low, ci_high=high, n=n_pairs),
                "layer_cosine": LayerValue(values=[float(v) for v in layer_mean], axis="block"),
                "layer_conflict": LayerValue(values=[float(v) for v in layer_conflict], axis="block"),
                "pairs": TableValue(columns=["task_a", "task_b", "cosine", "conflict_fraction", "ci_low", "ci_high",
                                             "n_batch_pairs"], rows=pair_rows),
                "pcgrad": TableValue(columns=["task", "relative_change", "cosine_to_original", "n_projections"],
                                     rows=pc_rows),
                "pcgrad_update_change": ScalarValue(value=update_change)}


def _kept(layout: Layout, entries: torch.Tensor | None) -> int:
    """Entries of a block's rows: its masked entries, or all of its layout's."""
    return int(entries.numel()) if entries is not None else layout.size


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, NaN where den is 0."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(num, math.nan))


def _cosines(gram: torch.Tensor) -> torch.Tensor:
    """Cosines from a Gram matrix (NaN where a vector is zero)."""
    norms = gram.diagonal().clamp(min=0).sqrt()
    return _ratio(gram, norms[:, None] * norms[None, :])
