"""gradients.layer_alignment: per layer, how aligned two tasks' mean gradients are, with a bootstrap CI
over examples and a label-permutation test (Benjamini-Hochberg across layers)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    GradientStore,
    LayerValue,
    ModelView,
    NotApplicable,
    PreparedData,
    Rung,
    RunShape,
    ScalarValue,
    Step,
    StoreBacking,
    TableValue,
    tasks_skip_reason,
)

from .common import upper_bound_examples
from .ladders import disk_rung
from .maths import bh, task_alignment
from .per_sample import ARTIFACT, mean_loss_rows, per_example_request
from .selection import Layout, SubsetMetric, SubsetParams, layout_of, planned_size, select_parameters


class AlignmentParams(SubsetParams):
    n_resamples: int = Field(1000, ge=10, description="bootstrap resamples of each task's examples (the CI)")
    n_permutations: int = Field(1000, ge=10, description="random relabellings of the pooled examples (the test)")
    ci_level: float = Field(0.95, gt=0, lt=1, description="confidence level of the bootstrap CIs")
    alpha: float = Field(0.05, gt=0, lt=1, description="false discovery rate of the Benjamini-Hochberg procedure")
    backing: StoreBacking = Field("memory", description="where the per-example gradients live: 'memory' or 'disk' "
                                                        "(a file in the run's scratch folder; the same values)")


def group_spans(layout: Layout, n_layers: int, entries: torch.Tensor | None) -> list[list[tuple[int, int]]]:
    """Per block (then everything outside the blocks), the [start, stop) spans of its entries in the
    kept vectors (``layout``'s entries, or only ``entries`` of them with masks)."""
    spans: list[list[tuple[int, int]]] = [[] for _ in range(n_layers + 1)]
    for i, layer in enumerate(layout.layers):
        start, stop = layout.offsets[i], layout.offsets[i + 1]
        if entries is not None:
            start, stop = (int(torch.searchsorted(entries, x)) for x in (start, stop))
        if stop > start:
            spans[n_layers if layer is None else layer].append((start, stop))
    return spans


class LayerAlignment(SubsetMetric):
    """For named tasks A, B, ... and per block l (and the parameters outside the blocks): g_i is
    example i's gradient of its mean token loss (the core's shared ``per_example_grads`` artifact,
    optionally on a parameter subset), m_A the mean of g_i over A's examples, and for each task pair

    - ``cosine`` cos(m_A, m_B) on the block's part of the gradients, with a plain percentile
      bootstrap CI (``n_resamples`` resamples drawing each task's examples with replacement,
      independently; seeded by the run's seed);
    - a permutation test. H0: the task labels are exchangeable over the pair's pooled examples, i.e.
      A and B are random splits of one set of examples, whose mean gradients are aligned no more
      than chance (which is not cos = 0: examples that share a mean gradient give random splits a
      positive cosine). One-sided (more aligned than chance): p = (1 + #{cos_perm >= cos}) /
      (1 + ``n_permutations``), relabellings keeping both task sizes; ``chance_cosine`` is the mean
      permuted cosine;
    - q: Benjamini-Hochberg (``scipy.stats.false_discovery_control``) over every (pair, block)
      test of the result, blocks and 'outside' (for two tasks: across the layers); the whole-model
      row ('all') has its own p, outside the correction.

    Everything comes from per-block Gram matrices of the per-example gradients, kept in RAM or on
    disk (``backing``, the same values). Separate from ``gradients.task_conflict``, which reads
    the batch gradients (``param_grad``) only: resampling examples needs per-example gradients,
    and this metric shares their one per-example backward with the plugin's other per-example
    metrics instead of adding it to every task_conflict run. Needs two examples per task (else
    skipped). Memory ladder: disk when the gradients fit there.
    """

    name = "gradients.layer_alignment"
    supports_dispatch = True  # reads the core's per-example gradients only
    version = "1"
    #: where every example has as many targets, the mean of the examples' mean-loss gradients is the mean of the
    #: batch gradients, so layer_cosine is task_conflict's layer_cosine computed again: equal by definition there
    derived_from = ("gradients.task_conflict.layer_cosine",)
    summary = "per-layer cosine of task mean gradients with bootstrap CI over examples, permutation test, BH"
    Params = AlignmentParams
    artifacts = (ARTIFACT,)
    fields = {"cosine": "whole-model cos of the task mean gradients (mean over task pairs; CI with one pair)",
              "p_value": "whole-model permutation p (the largest over task pairs)",
              "layer_cosine": "per block: cos of the task mean gradients (mean over task pairs)",
              "layer_chance_cosine": "per block: mean cosine under random relabelling (mean over task pairs)",
              "layer_q": "per block: BH-adjusted permutation p (the largest over task pairs)",
              "n_aligned_layers": "(pair, block) tests with q < alpha",
              "layers": "table per task pair and group (blocks, 'outside', 'all'): cosine, CI, chance cosine, p, q, "
                        "examples"}

    @classmethod
    def skip_reason(cls, params: AlignmentParams, view: ModelView, data: PreparedData | None) -> str | None:
        return tasks_skip_reason(data)

    @classmethod
    def artifact_requests(cls, params: AlignmentParams, view: ModelView) -> dict[str, Mapping[str, Any]]:
        return per_example_request(params, view)

    @classmethod
    def cost(cls, params: AlignmentParams, view: ModelView, shape: RunShape) -> Cost:
        """One row per example and block (``GradientStore.declared_bytes``) and the masks' entry indices;
        working memory, a batch's mean-loss gradients (``mean_loss_rows``) held while each block's columns
        go to its store."""
        n = upper_bound_examples(shape.n_sequences, shape.n_batches, shape.batch_size)
        try:
            layout = layout_of(view, select_parameters(view, params.parameters, params.layers))
        except ValueError:
            layout = layout_of(view, [])
        size, indices = planned_size(view, params)
        return Cost(state_bytes=sum(GradientStore.declared_bytes(n, block.size, "none", view.dtype_bytes,
                                                                 params.backing)
                                    for block, _ in layout.by_block(view.n_layers)) + indices,
                    transient_bytes=shape.batch_size * size * view.dtype_bytes)

    @classmethod
    def ladder(cls, params: AlignmentParams, view: ModelView, shape: RunShape) -> Sequence[Rung]:
        """Disk (exact) when the per-example gradients fit in the scratch folder's free space."""
        n = upper_bound_examples(shape.n_sequences, shape.n_batches, shape.batch_size)
        disk = disk_rung(params, GradientStore.disk_bytes(n, planned_size(view, params)[0], "none", view.dtype_bytes))
        return [disk] if disk is not None else []

    def setup(self) -> None:
        self.chosen = self.subset()
        self.spans = group_spans(layout_of(self.view, self.chosen.names), self.view.n_layers, self.chosen.entries)
        self.stores = [GradientStore(sum(b - a for a, b in spans), backing=self.params.backing)
                       for spans in self.spans]
        self.layouts: dict[tuple[str, ...], Layout] = {}
        self.tasks: list[str] = []

    def update(self, step: Step) -> None:
        if step.task is None:
            return
        rows = mean_loss_rows(self.view, self.chosen, step[ARTIFACT], self.layouts)
        for spans, store in zip(self.spans, self.stores, strict=True):
            store.add(torch.cat([rows[:, a:b] for a, b in spans], dim=1) if spans else rows[:, :0])
        self.tasks += [step.task] * rows.shape[0]

    def finalize(self) -> dict[str, object]:
        L, p = self.view.n_layers, self.params
        grams = torch.stack([store.gram() for store in self.stores])  # [L + 1, N, N]
        for store in self.stores:
            store.close()
        grams = torch.cat([grams, grams.sum(dim=0, keepdim=True)])  # + the whole model
        tasks = list(dict.fromkeys(self.tasks))
        members = {t: np.array([i for i, x in enumerate(self.tasks) if x == t]) for t in tasks}
        few = [t for t in tasks if len(members[t]) < 2]
        if few:
            raise NotApplicable(f"tasks {few} have fewer than two examples: a bootstrap over examples needs two",
                                "give every task at least two sequences")
        labels = [str(layer) for layer in range(L)] + ["outside", "all"]
        pairs = list(itertools.combinations(tasks, 2))
        results = [task_alignment(grams, members[a], members[b], n_resamples=p.n_resamples,
                                  n_permutations=p.n_permutations, level=p.ci_level, seed=self.shape.seed)
                   for a, b in pairs]
        q = bh(np.concatenate([r.p_value[:L + 1] for r in results])).reshape(len(pairs), L + 1)
        q = np.concatenate([q, np.full((len(pairs), 1), np.nan)], axis=1)  # 'all': outside the correction
        rows = [[a, b, labels[g], float(r.cosine[g]), float(r.ci_low[g]), float(r.ci_high[g]), float(r.chance[g]),
                 float(r.p_value[g]), float(q[k, g]), len(members[a]), len(members[b])]
                for k, ((a, b), r) in enumerate(zip(pairs, results, strict=True)) for g in range(L + 2)]
        cos = np.array([r.cosine for r in results])
        low, high = (float(results[0].ci_low[-1]), float(results[0].ci_high[-1])) if len(pairs) == 1 else (None, None)
        with np.errstate(invalid="ignore"):
            return {"cosine": ScalarValue(value=float(cos[:, -1].mean()), ci_low=low, ci_high=high, n=len(self.tasks)),
                    "p_value": ScalarValue(value=float(max(r.p_value[-1] for r in results))),
                    "layer_cosine": LayerValue(values=cos[:, :L].mean(axis=0).tolist(), axis="block"),
                    "layer_chance_cosine": LayerValue(values=np.array([r.chance[:L] for r in results]).mean(axis=0)
                                                      .tolist(), axis="block"),
                    "layer_q": LayerValue(values=q[:, :L].max(axis=0).tolist(), axis="block"),
                    "n_aligned_layers": ScalarValue(value=int((q[:, :L + 1] < p.alpha).sum())),
                    "layers": TableValue(columns=["task_a", "task_b", "group", "cosine", "ci_low", "ci_high",
                                                  "chance_cosine", "p_value", "q_value", "n_a", "n_b"], rows=rows)}
