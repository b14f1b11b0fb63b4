"""fisher.masks (top-p% importance masks from the Fisher diagonal) and fisher.overlap (their overlap
between tasks, per block and overall)."""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal

import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    LayerValue,
    Metric,
    ModelView,
    NotApplicable,
    Params,
    PreparedData,
    RunShape,
    ScalarValue,
    TableValue,
    tasks_skip_reason,
)

from .diagonal import diagonal_kinds, diagonal_tasks, read_diagonal
from .fisher_grads import layout_of


class MaskParams(Params):
    top_percent: float = Field(10.0, gt=0.0, le=100.0,
                               description="percentage of entries kept: the ceil(top_percent/100 x n) largest")
    kind: Literal["true", "empirical"] = Field("true", description="which Fisher diagonal ranks the entries")
    scope: Literal["global", "per_parameter"] = Field(
        "global", description="rank all trainable entries together, or each parameter tensor on its own")


def top_mask(values: torch.Tensor, percent: float) -> torch.Tensor:
    """Boolean mask of the ceil(percent/100 x n) largest entries of ``values``; among equal
    values the earlier entries (flattened order) win, so the count is exact."""
    flat = values.reshape(-1)
    k = math.ceil(percent / 100 * flat.numel() - 1e-9)
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.reshape(values.shape)


class FisherMasks(Metric):
    """Top-p% importance masks from ``fisher.diagonal``: an entry is kept when its Fisher value is
    among the ceil(p/100 x n) largest, over all trainable entries (``scope='global'``) or within
    its parameter tensor (``'per_parameter'``); ties at the cut go to the entry earlier in
    ``named_parameters`` and flattened order. Pooled over the run's data and per task.
    The gradients plugin reads these with ``mask_metric='fisher.masks'`` (``mask_field_prefix``
    ``'mask/'`` for the pooled masks, ``'mask/<task>/'`` for one task's).
    """

    name = "fisher.masks"
    supports_dispatch = True  # reads fisher.diagonal's results and the parameters' names and shapes
    version = "1"
    summary = "top-p% Fisher importance masks per parameter, pooled and per task"
    Params = MaskParams
    requires_metrics = ("fisher.diagonal",)
    derived_from = ("fisher.diagonal",)
    fields = {
        "mask/<param>": "boolean mask shaped like the parameter (pooled data)",
        "mask/<task>/<param>": "the same from one task's Fisher",
        "n_selected, n_selected/<task>": "entries kept",
        "threshold, threshold/<task>": "smallest Fisher value kept (global scope only)",
    }

    @classmethod
    def cost(cls, params: MaskParams, view: ModelView, shape: RunShape) -> Cost:
        """Nothing held across batches. Results: one boolean per trainable entry per mask, pooled and per
        task the diagonal kept (none at its ``pooled`` rung). Finalize, one mask at a time: the float64
        diagonal and its flattened copy, and the sort's values and int64 indices (one parameter's, with
        ``scope='per_parameter'``)."""
        sizes = [p.numel() for p in view.model.parameters() if p.requires_grad]
        diagonal = shape.dependency_params.get("fisher.diagonal")
        if diagonal is not None and params.kind not in diagonal.kinds:
            return Cost(state_bytes=0)  # ends skipped: the diagonal has no such Fisher
        tasks = shape.tasks if diagonal is None or diagonal.per_task else ()
        masks = (1 + len(tasks)) * sum(sizes)
        ranked = sum(sizes) if params.scope == "global" else max(sizes, default=0)
        working = 8 * sum(sizes) + (8 if params.scope == "global" else 0) * sum(sizes) + 16 * ranked
        return Cost(state_bytes=0, result_bytes=masks, finalize_bytes=masks + working)

    def finalize(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        result = self.deps["fisher.diagonal"]
        if self.params.kind not in diagonal_kinds(result):
            raise NotApplicable(f"fisher.diagonal has no {self.params.kind} Fisher: it ran at its 'true-only' memory "
                                "rung", "use kind='true', raise --memory-budget, or pin fisher.diagonal's rung: "
                                "--rung fisher.diagonal=mean-only")
        for task in (None, *diagonal_tasks(result, self.shape.tasks)):
            diag = read_diagonal(self.view, result, self.tensor_of, self.params.kind, task)
            seg, suffix = ("", "") if task is None else (f"{task}/", f"/{task}")
            if self.params.scope == "global":
                flat = torch.cat([d.reshape(-1) for d in diag.values()])
                mask = top_mask(flat, self.params.top_percent)
                masks = dict(zip(diag, torch.split(mask, [d.numel() for d in diag.values()]), strict=True))
                out["threshold" + suffix] = ScalarValue(value=float(flat[mask].min()))
            else:
                masks = {n: top_mask(d, self.params.top_percent) for n, d in diag.items()}
            for name, m in masks.items():
                out[f"mask/{seg}{name}"] = m.reshape(diag[name].shape)
            out["n_selected" + suffix] = ScalarValue(value=float(sum(int(m.sum()) for m in masks.values())))
        return out


class FisherOverlap(Metric):
    """How much the tasks' ``fisher.masks`` overlap, for every pair of tasks (a, b) in the run's
    order: Jaccard |A and B| / |A or B| and the overlap coefficient |A and B| / min(|A|, |B|),
    per block (the entries of ``view.blocks[l]``; the last entry, ``outside``, is the rest:
    embeddings, final norm, head) and over the whole model. Undefined ratios (empty union or
    an empty mask) are null.
    """

    name = "fisher.overlap"
    supports_dispatch = True  # reads fisher.masks' results
    version = "1"
    summary = "Jaccard and overlap coefficient of the tasks' Fisher masks, per block and overall"
    requires_metrics = ("fisher.masks",)
    derived_from = ("fisher.masks",)
    fields = {
        "jaccard/<a>/<b>": "per block, then 'outside': |A and B| / |A or B|",
        "overlap_coef/<a>/<b>": "per block, then 'outside': |A and B| / min(|A|, |B|)",
        "jaccard_overall/<a>/<b>, overlap_coef_overall/<a>/<b>": "the same over all entries",
        "pairs": "table: task_a, task_b, n_a, n_b, n_both, jaccard, overlap_coef (overall)",
    }

    @classmethod
    def skip_reason(cls, params: Any, view: ModelView, data: PreparedData | None) -> str | None:
        return tasks_skip_reason(data)

    @classmethod
    def cost(cls, params: Any, view: ModelView, shape: RunShape) -> Cost:
        return Cost(state_bytes=0)

    def finalize(self) -> dict[str, Any]:
        view = self.view
        result = self.deps["fisher.masks"]
        missing = [t for t in self.shape.tasks if f"n_selected/{t}" not in result.values]
        if missing:
            raise NotApplicable(f"fisher.masks has no mask of task {missing[0]!r}: fisher.diagonal ran pooled over the "
                                "tasks (its 'pooled' memory rung)", "raise --memory-budget, or pin fisher.diagonal's "
                                "rung: --rung fisher.diagonal=asked")
        layer_of = view.layer_of_parameter()
        layout = layout_of(view)
        block = {n: view.n_layers if layer is None else layer for n, layer in layer_of.items()}
        index = torch.cat([torch.full((sl.stop - sl.start,), block[n]) for n, (sl, _) in layout.items()])
        labels = [str(layer) for layer in range(view.n_layers)] + ["outside"]
        masks = {t: torch.cat([self._mask(result, f"mask/{t}/{n}").reshape(-1) for n in layout])
                 for t in self.shape.tasks}
        out: dict[str, Any] = {}
        rows = []
        for a, b in itertools.combinations(self.shape.tasks, 2):
            counts = pair_counts(masks[a], masks[b], index, view.n_layers + 1)
            jaccard, coef = overlaps(counts)
            out[f"jaccard/{a}/{b}"] = LayerValue(values=jaccard, labels=labels, axis="labelled")
            out[f"overlap_coef/{a}/{b}"] = LayerValue(values=coef, labels=labels, axis="labelled")
            totals = counts.sum(dim=1, keepdim=True)
            (overall_j,), (overall_c,) = overlaps(totals)
            out[f"jaccard_overall/{a}/{b}"] = ScalarValue(value=overall_j)
            out[f"overlap_coef_overall/{a}/{b}"] = ScalarValue(value=overall_c)
            rows.append([a, b, *(int(t) for t in totals[:3, 0]), overall_j, overall_c])
        out["pairs"] = TableValue(columns=["task_a", "task_b", "n_a", "n_b", "n_both", "jaccard", "overlap_coef"],
                                  rows=rows)
        return out

    def _mask(self, result: Any, field: str) -> torch.Tensor:
        value = result.values[field]
        if isinstance(value, ScalarValue):  # one-entry parameters are stored as scalars
            return torch.tensor([bool(value.value)])
        return self.tensor_of(result, field).bool()


def pair_counts(a: torch.Tensor, b: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """[4, n_groups] float64: per group, |A|, |B|, |A and B|, |A or B| of two flat boolean masks."""
    return torch.stack([torch.bincount(group[m], minlength=n_groups).double() for m in (a, b, a & b, a | b)])


def overlaps(counts: torch.Tensor) -> tuple[list[float | None], list[float | None]]:
    """Jaccard |A and B| / |A or B| and overlap coefficient |A and B| / min(|A|, |B|) per column of
    ``pair_counts``; None where the denominator is 0."""
    n_a, n_b, both, union = counts
    return _ratio(both, union), _ratio(both, torch.minimum(n_a, n_b))


def _ratio(num: torch.Tensor, den: torch.Tensor) -> list[float | None]:
    return [None if float(d) == 0 else float(n) / float(d) for n, d in zip(num, den, strict=True)]
