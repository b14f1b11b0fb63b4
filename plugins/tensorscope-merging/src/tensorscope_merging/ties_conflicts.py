"""merging.ties_conflicts: TIES trim / elect / disjoint merge of fine-tunes, and where their signs conflict."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    Interpretation,
    MetricResult,
    ModelSetMetric,
    ModelView,
    Params,
    RunShape,
    ScalarValue,
    TableValue,
    TextValue,
)

from .evaluate import compare_merges, loss_skip_reason
from .save import save_merged
from .ties import SignCounts, keep_count, sign_counts, task_arithmetic, ties_merge
from .weights import Groups, check_compatible, members, number, parameters


class TiesParams(Params):
    density: float = Field(0.2, gt=0, le=1, description="share of each task vector's entries the trim keeps "
                                                         "(global per task; the reference's K, README topk20); "
                                                         "1 = no trim")
    lam: float = Field(1.0, description="TIES scaling: theta = theta_base + lam * tau_merged "
                                        "(the reference sweeps 0.8..2.5)")
    arithmetic_lam: float = Field(0.3, description="task arithmetic: theta = theta_base + lam * sum_t tau_t "
                                                   "(the reference sweeps 0.1..1.0)")
    evaluate: bool = Field(True, description="evaluate the merges' and the task models' loss on each task's data")
    save_to: str | None = Field(None, description="write the TIES-merged model here: a folder (Hugging Face, like "
                                                  "the input) or a .safetensors file (bare state dict)")


#: fine-tunes the declared cost is sized for (a TIES merge needs at least two; see ``TiesConflicts.cost``)
TASKS_DECLARED = 2


def percent(share: float) -> str:
    """0.65 -> '65%', 0.0017 -> '0.17%' (three significant digits)."""
    return f"{100 * share:.3g}%"


def stacked_task_vectors(views: Mapping[str, ModelView], base: Mapping[str, torch.Tensor], tasks: list[str],
                         names: list[str]) -> torch.Tensor:
    """[n_tasks, d]: each task's ``theta_task - theta_base`` as one vector over ``names`` in order, at least
    float32 (half-precision sums lose the small entries). Written row by row into one tensor: no
    per-task dict of task vectors, nor a second copy from stacking, is ever held."""
    dtype = torch.promote_types(base[names[0]].dtype, torch.float32)
    out = torch.empty(len(tasks), sum(base[n].numel() for n in names), dtype=dtype, device=base[names[0]].device)
    for row, task in zip(out, tasks, strict=True):
        theta, start = parameters(views[task]), 0
        for n in names:
            size = base[n].numel()
            row[start:start + size] = (theta[n] - base[n]).reshape(-1).to(dtype)
            start += size
    return out


def unflatten(flat: torch.Tensor, like: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    out, start = {}, 0
    for n in names:
        size = like[n].numel()
        out[n] = flat[start:start + size].view_as(like[n]).to(like[n].dtype)
        start += size
    return out


def counts_per_group(stack: torch.Tensor, like: Mapping[str, torch.Tensor], names: list[str],
                     groups: Groups) -> list[SignCounts]:
    counts = [SignCounts(0, 0, 0, 0.0) for _ in groups.labels]
    start = 0
    for n in names:
        size = like[n].numel()
        counts[groups.of[n]] = counts[groups.of[n]] + sign_counts(stack[:, start:start + size])
        start += size
    return counts


class TiesConflicts(ModelSetMetric):
    """TIES-merging (Yadav et al., NeurIPS 2023) of the fine-tunes' task vectors and their sign conflicts.

    Each task vector is one flat vector over all parameters (sorted names; a tied tensor once).
    **Trim** keeps the top ``density`` magnitudes of each task vector globally, exactly as the
    reference ``topk_values_mask``: entries with ``|v| >=`` the k-th smallest magnitude,
    ``k = d - int(d*density)``, i.e. ``int(d*density) + 1`` entries (more on ties; field
    ``keep_count``). **Elect**: ``sign(sum_t trimmed)``, zeros taking the majority sign.
    **Disjoint merge**: the mean of the trimmed entries that agree with the elected sign.
    ``theta = theta_base + lam * tau_merged``; the plain task-arithmetic merge is
    ``theta_base + arithmetic_lam * sum_t tau_t``.

    An entry conflicts when the non-zero task values have both signs; per layer (blocks, then
    ``outside``) the conflicting share of all entries and of the entries where two or more tasks
    are non-zero, before and after the trim, and the mean sign agreement ratio
    ``|n_pos - n_neg| / (n_pos + n_neg)`` after the trim (1 where every task is zero). With
    ``evaluate`` each task model's, the base's and both merges' loss on each task's data;
    ``save_to`` writes the TIES-merged model. Needs a base and at least two fine-tunes.
    """

    name = "merging.ties_conflicts"
    version = "1"
    summary = "TIES trim/elect/merge of fine-tunes, per-layer sign conflicts and the merged model's loss"
    needs_base = True
    Params = TiesParams
    fields = {
        "conflict": "per layer share of entries whose trimmed task values have both signs",
        "conflict_among_shared": "per layer conflicting share of the entries with >= 2 non-zero trimmed values",
        "conflict_pre_trim": "per layer conflict share before the trim (raw task vectors)",
        "conflict_pre_trim_among_shared": "the same over entries with >= 2 non-zero raw values",
        "sign_agreement": "per layer mean sign agreement ratio of the trimmed task vectors",
        "conflict_total, conflict_pre_trim_total, sign_agreement_total": "the same over all parameters",
        "keep_count": "entries the trim keeps per task without ties, int(d * density) + 1",
        "kept_fraction/<task>": "share of the task's entries non-zero after the trim",
        "merged_norm": "per layer ||lam * tau_merged||_2",
        "ranking": "layers by post-trim conflict, highest first",
        "summary": "the most conflicted layer in words",
        "loss/<model>[/<task>], merged_loss/{ties,task_arithmetic}[/<task>]": "token-mean loss on each task's data "
                                                                                "(and accuracy/...)",
        "losses": "table of the losses of the base, the task models and both merges",
        "saved_to": "where the TIES-merged model was written",
    }

    @classmethod
    def cost(cls, params: Any, view: ModelView, shape: RunShape) -> Cost:
        """What ``compute_set`` holds at once, d = the parameters' entries, at least float32 for the
        flat vectors: the stacked task vectors and their trimmed copy (``vectors``, ``trimmed``:
        2 x TASKS_DECLARED x d), the merged update(s) (``updates``: d each) and the merged weights in
        the parameters' dtype (``merged``: d each): TIES, and with ``evaluate`` task arithmetic too.

        The core sizes a model-set cost on one member, so the number of fine-tunes is not known here:
        the declaration is for the two a TIES merge needs at least; each further fine-tune holds
        2 x d more. FLOPs: the k-th value selection and the forward passes of the evaluation."""
        forward = 2.0 * view.n_params * shape.n_batches * shape.batch_size * shape.seq_len if params.evaluate else 0
        merges = 2 if params.evaluate else 1
        flat = max(4, view.dtype_bytes) * view.n_params
        return Cost(state_bytes=(2 * TASKS_DECLARED + merges) * flat + merges * view.param_bytes,
                    flops=float(10 * view.n_params) + forward)

    @classmethod
    def own_passes(cls, params: Any, view: ModelView, shape: RunShape, members: Sequence[str],
                   base_name: str | None) -> dict[str, int]:
        """With ``evaluate``, one forward per batch of the base's data for every member (the base
        and each fine-tune: ``members``) and for each of the two merges (TIES, task arithmetic):
        ``(members + 2) * n_batches``; none without."""
        return {"replay_forward": (len(members) + 2) * shape.n_batches} if params.evaluate else {}

    @classmethod
    def uses_data(cls, params: Any) -> bool:
        return bool(params.evaluate)

    @classmethod
    def interpret(cls, result: MetricResult) -> list[Interpretation]:
        """The most conflicted layer, as a hotspot."""
        ranking, summary = result.values.get("ranking"), result.values.get("summary")
        if not isinstance(ranking, TableValue) or not isinstance(summary, TextValue) or not ranking.rows:
            return []
        return [Interpretation(level="hotspot", text=summary.text, where=f"layer {ranking.rows[0][1]}")]

    @classmethod
    def set_skip_reason(cls, params: Any, views: Mapping[str, ModelView], base_name: str | None) -> str | None:
        found = members(views, base_name)
        if len(found) < 2:
            return (f"needs at least two fine-tunes beside the base (got {len(found)}): "
                    "analyze({'math': ft1, 'code': ft2}, base=base_model)")
        return loss_skip_reason(views) if params.evaluate else None

    def setup(self) -> None:
        #: what compute_set holds (see ``cost``): [n_tasks, d] task vectors and their trimmed copy,
        #: the flat merged update of each merge and its merged weights, by merge
        self.vectors = torch.zeros(0)
        self.trimmed = torch.zeros(0)
        self.updates: dict[str, torch.Tensor] = {}
        self.merged: dict[str, dict[str, torch.Tensor]] = {}

    def compute_set(self, views: Mapping[str, ModelView],
                    results: Mapping[str, Mapping[str, MetricResult]]) -> dict[str, Any]:
        assert self.base_name is not None
        p: TiesParams = self.params
        check_compatible(views)
        base_view = views[self.base_name]
        base = parameters(base_view)
        names = sorted(base)
        groups = Groups.of_view(base_view)
        tasks = members(views, self.base_name)
        self.vectors = stacked_task_vectors(views, base, tasks, names)
        self.trimmed, _, merged = ties_merge(self.vectors, p.density)
        self.updates["ties"] = merged
        post = counts_per_group(self.trimmed, base, names, groups)
        pre = counts_per_group(self.vectors, base, names, groups)
        total_post, total_pre = sum(post, SignCounts(0, 0, 0, 0.0)), sum(pre, SignCounts(0, 0, 0, 0.0))
        self.merged["ties"] = ties_weights = {n: base[n] + p.lam * t for n, t in unflatten(merged, base,
                                                                                          names).items()}
        out: dict[str, Any] = {
            "conflict": groups.layer_value([c.conflict_fraction for c in post]),
            "conflict_among_shared": groups.layer_value([c.conflict_among_shared for c in post]),
            "conflict_pre_trim": groups.layer_value([c.conflict_fraction for c in pre]),
            "conflict_pre_trim_among_shared": groups.layer_value([c.conflict_among_shared for c in pre]),
            "sign_agreement": groups.layer_value([c.agreement for c in post]),
            "conflict_total": ScalarValue(value=number(total_post.conflict_fraction), n=total_post.total),
            "conflict_pre_trim_total": ScalarValue(value=number(total_pre.conflict_fraction), n=total_pre.total),
            "sign_agreement_total": ScalarValue(value=number(total_post.agreement), n=total_post.total),
            "keep_count": ScalarValue(value=keep_count(self.vectors.shape[1], p.density)),
            "merged_norm": groups.layer_value(groups.sum_squares(
                (n, w - base[n]) for n, w in ties_weights.items()).sqrt()),
        }
        for task, row in zip(tasks, self.trimmed, strict=True):
            out[f"kept_fraction/{task}"] = ScalarValue(value=float((row != 0).sum()) / row.numel())
        out.update(self._ranking(post, pre, groups))
        if p.evaluate:
            self.updates["task_arithmetic"] = task_arithmetic(self.vectors, p.arithmetic_lam)
            self.merged["task_arithmetic"] = arithmetic = {
                n: base[n] + t for n, t in unflatten(self.updates["task_arithmetic"], base, names).items()}
            data = self.data[self.base_name]
            out.update(compare_merges(views, base_view, {"ties": ties_weights, "task_arithmetic": arithmetic},
                                      data, self.loss_targets))
        if p.save_to:
            out["saved_to"] = TextValue(text=str(save_merged(base_view, ties_weights, Path(p.save_to))))
        return out

    def _ranking(self, post: list[SignCounts], pre: list[SignCounts], groups: Groups) -> dict[str, Any]:
        order = sorted(range(len(post)), key=lambda g: (math.isnan(post[g].conflict_fraction),
                                                        -post[g].conflict_fraction if post[g].total else 0.0))
        rows = [[rank + 1, groups.label(g), number(post[g].conflict_fraction), number(post[g].conflict_among_shared),
                 number(pre[g].conflict_fraction), post[g].total] for rank, g in enumerate(order)]
        top = order[0]
        where = "outside the blocks" if groups.label(top) == "outside" else f"layer {groups.label(top)}"
        text = (f"{percent(post[top].conflict_fraction)} weight conflicts in {where} after trimming to the top "
                f"{percent(self.params.density)} ({percent(pre[top].conflict_fraction)} before trimming)")
        return {"ranking": TableValue(columns=["rank", "layer", "conflict", "conflict_among_shared",
                                               "conflict_pre_trim", "entries"], rows=rows),
                "summary": TextValue(text=text)}
