"""merging.ties_conflicts: TIES trim / elect / disjoint merge of fine-tunes, and where their signs conflict."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
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
    Rung,
    RunShape,
    ScalarValue,
    TableValue,
    TextValue,
)

from .evaluate import compare_merges, loss_skip_reason
from .flat import Piece, WorkBlock, kth_smallest, pieces, work_entries
from .save import save_merged
from .ties import (
    SignCounts,
    disjoint_merge,
    elect_signs,
    keep_count,
    sign_balance,
    sign_counts,
    task_arithmetic,
    trim_at,
    trim_rank,
)
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


#: the rung that leaves the merges' loss evaluation out (then no merged model is ever held)
CONFLICTS_ONLY = "conflicts_only"


def percent(share: float) -> str:
    """0.65 -> '65%', 0.0017 -> '0.17%' (three significant digits)."""
    return f"{100 * share:.3g}%"


@dataclass
class Tally:
    """What the counting walk over the task vectors finds: sign counts per layer group, before and
    after the trim, the kept entries per task and the elected signs' balance (-> majority sign)."""

    pre: list[SignCounts]
    post: list[SignCounts]
    kept: torch.Tensor
    balance: int = 0

    @classmethod
    def empty(cls, groups: Groups, tasks: int) -> Tally:
        zero = SignCounts(0, 0, 0, 0.0)
        return cls([zero] * len(groups.labels), [zero] * len(groups.labels), torch.zeros(tasks, dtype=torch.int64))

    @property
    def majority(self) -> torch.Tensor:
        return torch.sign(torch.tensor(float(self.balance)))


class TaskStack:
    """The fine-tunes' task vectors, stacked [n_tasks, d] but never held: walked a slice at a time
    through one working block. ``trim`` and ``majority`` are set once their walks have found them."""

    def __init__(self, base: Mapping[str, torch.Tensor], thetas: Sequence[Mapping[str, torch.Tensor]],
                 entries: int) -> None:
        like = next(iter(base.values()))
        self.base, self.thetas = base, thetas
        self.block = WorkBlock(len(thetas), entries, torch.promote_types(like.dtype, torch.float32), like.device)
        self.d = sum(t.numel() for t in base.values())
        self.thresholds: torch.Tensor | None = None
        self.majority = torch.tensor(1.0)

    def walk(self) -> Iterator[tuple[Piece, torch.Tensor]]:
        """Every slice of the stacked task vectors, [n_tasks, slice], in the working block."""
        for piece in pieces(self.base, self.block.width):
            yield piece, self.block.differences(piece, self.thetas, self.base)

    def find_thresholds(self, density: float) -> None:
        """Each task's trim threshold: its ``trim_rank``-th smallest magnitude (none without a trim)."""
        rank = trim_rank(self.d, density)
        self.thresholds = None if rank is None else kth_smallest(
            lambda: (v.abs() for _, v in self.walk()), [rank] * len(self.thetas))

    def tally(self, groups: Groups) -> Tally:
        """One walk: the sign counts per layer group before and after the trim, the kept entries and
        the elected signs' balance; sets ``majority``."""
        tally = Tally.empty(groups, len(self.thetas))
        for piece, vectors in self.walk():
            group = groups.of[piece.name]
            trimmed = trim_at(vectors, self.thresholds)
            tally.pre[group] = tally.pre[group] + sign_counts(vectors)
            tally.post[group] = tally.post[group] + sign_counts(trimmed)
            tally.kept += (trimmed != 0).sum(dim=1).cpu()
            tally.balance += sign_balance(trimmed)
        self.majority = tally.majority
        return tally

    def update(self, piece: Piece, vectors: torch.Tensor, label: str, params: TiesParams) -> torch.Tensor:
        """A merge's change of the base on one slice, in the parameters' dtype: ``lam * tau_merged``
        (``ties``) or ``arithmetic_lam * sum_t tau_t`` (``task_arithmetic``)."""
        dtype = self.base[piece.name].dtype
        if label == "ties":
            trimmed = trim_at(vectors, self.thresholds)
            return params.lam * disjoint_merge(trimmed, elect_signs(trimmed, self.majority)).to(dtype)
        return task_arithmetic(vectors, params.arithmetic_lam).to(dtype)

    def merged(self, label: str, params: TiesParams) -> dict[str, torch.Tensor]:
        """The merged weights ``label``: ``theta_base`` plus its ``update``."""
        out = {n: torch.empty_like(t) for n, t in self.base.items()}
        for piece, vectors in self.walk():
            torch.add(piece.of(self.base[piece.name]), self.update(piece, vectors, label, params),
                      out=piece.of(out[piece.name]))
        return out


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

    Nothing model-sized is stacked: the task vectors are walked a slice at a time through one
    working block (``flat.WorkBlock``): for the trim's thresholds (radix selection, exactly the
    reference's ``kthvalue``), for the counts and for each merge; only the merged model being
    evaluated or saved is held, whatever the number of fine-tunes.
    """

    name = "merging.ties_conflicts"
    version = "2"
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
        """The working block (``work``: ``flat.WORK_ENTRIES`` entries, at least float32) and, with
        ``evaluate`` or ``save_to``, the one merged model held at a time (``merged``, the parameters'
        bytes). Neither grows with the number of fine-tunes. FLOPs: the walks over the task vectors
        and the forward passes of the evaluation."""
        forward = 2.0 * view.n_params * shape.n_batches * shape.batch_size * shape.seq_len if params.evaluate else 0
        work = max(4, view.dtype_bytes) * work_entries(view)
        merged = view.param_bytes if params.evaluate or params.save_to else 0
        return Cost(state_bytes=work + merged, flops=float(30 * view.n_params) + forward)

    @classmethod
    def ladder(cls, params: Any, view: ModelView, shape: RunShape) -> Sequence[Rung]:
        """Without the loss evaluation no merged model is held (not offered when ``save_to`` needs one)."""
        if not params.evaluate or params.save_to:
            return ()
        return (Rung(CONFLICTS_ONLY, params.model_copy(update={"evaluate": False}),
                     "conflicts and merges exact; the merges' loss evaluation (loss/*, merged_loss/*, losses) "
                     "left out"),)

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
        #: what compute_set holds (see ``cost``): the working block the task vectors are written into,
        #: a slice at a time, and the one merged model evaluated or saved, by merge
        self.work = torch.zeros(0)
        self.merged: dict[str, dict[str, torch.Tensor]] = {}

    def compute_set(self, views: Mapping[str, ModelView],
                    results: Mapping[str, Mapping[str, MetricResult]]) -> dict[str, Any]:
        assert self.base_name is not None
        p: TiesParams = self.params
        check_compatible(views)
        base_view = views[self.base_name]
        groups = Groups.of_view(base_view)
        tasks = members(views, self.base_name)
        stack = TaskStack(parameters(base_view), [parameters(views[t]) for t in tasks], work_entries(base_view))
        self.work = stack.block.data
        stack.find_thresholds(p.density)
        tally = stack.tally(groups)
        total_post, total_pre = sum(tally.post, SignCounts(0, 0, 0, 0.0)), sum(tally.pre, SignCounts(0, 0, 0, 0.0))
        merged_squares = groups.sum_squares((piece.name, stack.update(piece, vectors, "ties", p))
                                            for piece, vectors in stack.walk())
        out: dict[str, Any] = {
            "conflict": groups.layer_value([c.conflict_fraction for c in tally.post]),
            "conflict_among_shared": groups.layer_value([c.conflict_among_shared for c in tally.post]),
            "conflict_pre_trim": groups.layer_value([c.conflict_fraction for c in tally.pre]),
            "conflict_pre_trim_among_shared": groups.layer_value([c.conflict_among_shared for c in tally.pre]),
            "sign_agreement": groups.layer_value([c.agreement for c in tally.post]),
            "conflict_total": ScalarValue(value=number(total_post.conflict_fraction), n=total_post.total),
            "conflict_pre_trim_total": ScalarValue(value=number(total_pre.conflict_fraction), n=total_pre.total),
            "sign_agreement_total": ScalarValue(value=number(total_post.agreement), n=total_post.total),
            "keep_count": ScalarValue(value=keep_count(stack.d, p.density)),
            "merged_norm": groups.layer_value(merged_squares.sqrt()),
        }
        for task, kept in zip(tasks, tally.kept.tolist(), strict=True):
            out[f"kept_fraction/{task}"] = ScalarValue(value=kept / stack.d)
        out.update(self._ranking(tally.post, tally.pre, groups))
        if p.save_to:
            saved = save_merged(base_view, self._hold("ties", stack), Path(p.save_to))
            out["saved_to"] = TextValue(text=str(saved))
        if p.evaluate:
            merges = {label: functools.partial(self._hold, label, stack) for label in ("ties", "task_arithmetic")}
            out.update(compare_merges(views, base_view, merges, self.data[self.base_name], self.loss_targets))
        return out

    def _hold(self, label: str, stack: TaskStack) -> dict[str, torch.Tensor]:
        """The merged weights ``label``, held as ``self.merged``: the only merge held (the previous
        one is dropped before this one is made)."""
        if label not in self.merged:
            self.merged = {}
            self.merged = {label: stack.merged(label, self.params)}
        return self.merged[label]

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
