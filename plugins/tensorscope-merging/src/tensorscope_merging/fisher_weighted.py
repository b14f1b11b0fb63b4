"""merging.fisher_weighted: how Fisher-weighted averaging (Matena & Raffel 2022) departs from plain averaging."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    MetricResult,
    ModelSetMetric,
    ModelView,
    Params,
    Rung,
    RunShape,
    ScalarValue,
    TextValue,
)

from .evaluate import compare_merges, loss_skip_reason
from .flat import Piece, WorkBlock, pieces, work_entries
from .weights import Groups, check_compatible, members, number, parameters

FISHER = "fisher.diagonal"
FISHER_MERGE, AVERAGE = "fisher", "average"
#: the rung that leaves the merges' loss evaluation out (then no merged model is ever held)
SHIFT_ONLY = "shift_only"


class FisherParams(Params):
    kind: Literal["true", "empirical"] = Field("true", description="which fisher.diagonal estimate weights the "
                                                                   "merge: true (labels from the model) or "
                                                                   "empirical (observed labels)")
    floor: float = Field(1e-6, ge=0, description="added to every Fisher entry, so entries no model has "
                                                 "information on fall back to the plain average")
    evaluate: bool = Field(True, description="evaluate both merges' and the task models' loss on each task's data")


def fisher_merge(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_m w_m theta_m / sum_m w_m`` per entry of stacked members [members, ...] (float64; the
    weights are the Fishers plus the floor)."""
    return (weights * values).sum(dim=0) / weights.sum(dim=0)


def plain_average(values: torch.Tensor) -> torch.Tensor:
    return values.mean(dim=0)


class MemberStack:
    """The merged members' weights and Fisher weights (plus the floor), stacked [members, d] but never
    held: walked a slice at a time through one float64 working block (two rows per member)."""

    def __init__(self, thetas: Sequence[Mapping[str, torch.Tensor]], fishers: Sequence[Mapping[str, torch.Tensor]],
                 floor: float, entries: int) -> None:
        self.thetas, self.fishers, self.floor = thetas, fishers, floor
        self.block = WorkBlock(2 * len(thetas), entries, torch.float64, next(iter(thetas[0].values())).device)

    def walk(self) -> Iterator[tuple[Piece, torch.Tensor, torch.Tensor]]:
        """(slice, members' values, Fisher weights) of every slice, in the working block."""
        for piece in pieces(self.thetas[0], self.block.width):
            yield (piece, self.block.values(piece, self.thetas),
                   self.block.values(piece, self.fishers, first_row=len(self.thetas), shift=self.floor))

    def merges(self, piece: Piece, values: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both merges of one slice, cast to the parameters' dtype."""
        dtype = self.thetas[0][piece.name].dtype
        return {FISHER_MERGE: fisher_merge(values, weights).to(dtype), AVERAGE: plain_average(values).to(dtype)}

    def merged(self, label: str) -> dict[str, torch.Tensor]:
        """The merged weights ``label`` (``fisher`` or ``average``)."""
        out = {n: torch.empty_like(t) for n, t in self.thetas[0].items()}
        for piece, values, weights in self.walk():
            piece.of(out[piece.name]).copy_(self.merges(piece, values, weights)[label])
        return out

    def shifts(self, groups: Groups) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer group, ``||theta_F - theta_avg||^2`` and ``mean_m ||theta_m - theta_avg||^2`` (float64)."""
        shift = torch.zeros(len(groups.labels), dtype=torch.float64)
        spread = torch.zeros(len(self.thetas), len(groups.labels), dtype=torch.float64)
        for piece, values, weights in self.walk():
            merges = self.merges(piece, values, weights)
            average = merges[AVERAGE].double()
            group = groups.of[piece.name]
            shift[group] += float((merges[FISHER_MERGE].double() - average).square().sum())
            spread[:, group] += (values - average).square().sum(dim=1).cpu()
        return shift, spread.mean(dim=0)


def fisher_field(result: MetricResult, kind: str, task: str, param: str) -> str:
    """The per-task field ``<kind>/<task>/<param>`` when the run had that task, else the pooled one."""
    per_task = f"{kind}/{task}/{param}"
    return per_task if per_task in result.values else f"{kind}/{param}"


class FisherWeighted(ModelSetMetric):
    """Fisher-weighted averaging of the fine-tunes (Matena & Raffel, "Merging Models with Fisher-Weighted
    Averaging", NeurIPS 2022): ``theta_F = sum_m (F_m + floor) theta_m / sum_m (F_m + floor)``, entrywise.

    ``F_m`` is member m's ``fisher.diagonal`` (another plugin's metric, asked for by name; install
    ``tensorscope[fisher]``): the field ``<kind>/<m>/<param>`` when the run's data has a task named
    like the member (the Fisher of the task model on its own task), else the pooled
    ``<kind>/<param>``; ``fisher_source`` says which. The base, if given, is not merged.

    Per layer (blocks, then ``outside``): ``shift = ||theta_F - theta_avg||`` against the plain average
    ``theta_avg``, and ``relative_shift = shift / sqrt(mean_m ||theta_m - theta_avg||^2)``: 0 when the
    weighting changes nothing (equal Fishers), 1 when it moves the merge as far as a member lies from
    the average (e.g. two members, one holding all the Fisher mass). With ``evaluate``, the loss of both
    merges and of every member on each task's data. Needs at least two models besides the base.
    """

    name = "merging.fisher_weighted"
    version = "2"
    summary = "Fisher-weighted vs plain averaging of fine-tunes: per-layer shift and the merges' loss per task"
    requires_metrics = (FISHER,)
    Params = FisherParams
    fields = {
        "shift": "per layer ||theta_fisher - theta_average||_2",
        "relative_shift": "per layer shift / rms distance of the members from the plain average",
        "relative_shift_total": "the same over all parameters",
        "fisher_source": "which fisher.diagonal field weighted each member",
        "loss/<model>[/<task>], merged_loss/{fisher,average}[/<task>]": "token-mean loss on each task's data "
                                                                          "(and accuracy/...)",
        "losses": "table of the members' and both merges' losses",
    }

    @classmethod
    def cost(cls, params: Any, view: ModelView, shape: RunShape) -> Cost:
        """The float64 working block (``work``: ``flat.WORK_ENTRIES`` entries, two rows per member) and,
        with ``evaluate``, the one merged model evaluated at a time (``merged``, the parameters' bytes);
        neither grows with the number of members (their weights and Fishers are read a slice at a time)."""
        forward = 2.0 * view.n_params * shape.n_batches * shape.batch_size * shape.seq_len if params.evaluate else 0
        merged = view.param_bytes if params.evaluate else 0
        return Cost(state_bytes=8 * work_entries(view) + merged, flops=float(12 * view.n_params) + forward)

    @classmethod
    def ladder(cls, params: Any, view: ModelView, shape: RunShape) -> Sequence[Rung]:
        """Without the loss evaluation no merged model is held."""
        if not params.evaluate:
            return ()
        return (Rung(SHIFT_ONLY, params.model_copy(update={"evaluate": False}),
                     "shifts exact; the merges' loss evaluation (loss/*, merged_loss/*, losses) left out"),)

    @classmethod
    def own_passes(cls, params: Any, view: ModelView, shape: RunShape, members: Sequence[str],
                   base_name: str | None) -> dict[str, int]:
        """With ``evaluate``, one forward per batch of the first merged model's data for every merged
        model (every member but the base) and for each of the two merges (Fisher-weighted, plain
        average): ``(merged + 2) * n_batches``; none without."""
        merged = len([m for m in members if m != base_name])
        return {"replay_forward": (merged + 2) * shape.n_batches} if params.evaluate else {}

    @classmethod
    def uses_data(cls, params: Any) -> bool:
        return bool(params.evaluate)

    @classmethod
    def set_skip_reason(cls, params: Any, views: Mapping[str, ModelView], base_name: str | None) -> str | None:
        found = members(views, base_name)
        if len(found) < 2:
            return f"needs at least two models to merge besides the base (got {len(found)})"
        return loss_skip_reason(views) if params.evaluate else None

    def setup(self) -> None:
        #: the working block (members' slices) and the one merged model evaluated, by name (see ``cost``)
        self.work = torch.zeros(0)
        self.merged: dict[str, dict[str, torch.Tensor]] = {}

    def compute_set(self, views: Mapping[str, ModelView],
                    results: Mapping[str, Mapping[str, MetricResult]]) -> dict[str, Any]:
        p: FisherParams = self.params
        names = members(views, self.base_name)
        merged_views = {m: views[m] for m in names}
        check_compatible(merged_views)
        thetas = [parameters(views[m]) for m in names]
        fishers, sources = [], []
        for m, theta in zip(names, thetas, strict=True):
            result = results[m][FISHER]
            fields = {param: fisher_field(result, p.kind, m, param) for param in theta}
            fishers.append({param: self.tensor_of(result, field) for param, field in fields.items()})
            per_task = all(f.startswith(f"{p.kind}/{m}/") for f in fields.values())
            sources.append(f"{m}: {p.kind}/{m}/<param>" if per_task else f"{m}: {p.kind}/<param> (pooled)")
        stack = MemberStack(thetas, fishers, p.floor, work_entries(views[names[0]]))
        self.work = stack.block.data
        groups = Groups.of_view(views[names[0]])
        shift, spread = stack.shifts(groups)
        relative = [math.sqrt(s / v) if v > 0 else math.nan for s, v in zip(shift.tolist(), spread.tolist(),
                                                                            strict=True)]
        total = math.sqrt(float(shift.sum()) / float(spread.sum())) if float(spread.sum()) > 0 else math.nan
        out: dict[str, Any] = {
            "shift": groups.layer_value(shift.sqrt()),
            "relative_shift": groups.layer_value(relative),
            "relative_shift_total": ScalarValue(value=number(total)),
            "fisher_source": TextValue(text="; ".join(sources)),
        }
        if p.evaluate:
            merges = {label: functools.partial(self._hold, label, stack) for label in (FISHER_MERGE, AVERAGE)}
            out.update(compare_merges(merged_views, views[names[0]], merges, self.data[names[0]], self.loss_targets))
        return out

    def _hold(self, label: str, stack: MemberStack) -> dict[str, torch.Tensor]:
        """The merged weights ``label``, held as ``self.merged``: the only merge held (the previous
        one is dropped before this one is made)."""
        self.merged = {}
        self.merged = {label: stack.merged(label)}
        return self.merged[label]
