"""interventions.vectors: the weight difference from a broken to a healthy model, where it recovers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    LayerValue,
    MetricResult,
    ModelSetMetric,
    ModelView,
    NotApplicable,
    Params,
    RunShape,
    ScalarValue,
    SeriesValue,
    TextValue,
    align,
    aligned_bytes,
    forward_act_bytes,
    mlp_unit_axes,
)

from .evaluate import data_loss
from .groups import group_of, layer_value, number
from .tasks import has_loss_target

Weights = dict[str, torch.Tensor]

DEFAULT_ALPHAS = [i / 10 for i in range(11)] + [1.25, 1.5]
#: entries of a parameter the norms copy to float64 at a time
NORM_CHUNK = 1 << 20


class VectorParams(Params):
    broken: str | None = Field(
        None,
        description="the broken (or base) model; default: the first of two members, "
        "or the base when the run has one and one other member",
    )
    healthy: str | None = Field(None, description="the healthy (or fine-tuned) model; default: the other member")
    alphas: list[float] = Field(
        DEFAULT_ALPHAS,
        min_length=1,
        description="points of the path theta_b + alpha v (0: broken, 1: healthy; beyond 1: overshoot)",
    )
    align: bool = Field(
        True,
        description="permute the healthy model's MLP units to match the broken one (weight "
        "matching) before taking the difference",
    )
    recovery_tol: float = Field(
        1e-6, gt=0.0, description="recovery is undefined when |L(broken) - L(healthy)| is at most this (nats)"
    )
    keep_vector: bool = Field(False, description="also return v itself, float32 [P] in named_parameters order")


def resolve_pair(params: VectorParams, views: Mapping[str, ModelView], base_name: str | None) -> tuple[str, str] | str:
    """(broken, healthy), or why they cannot be chosen."""
    names = list(views)
    unknown = [n for n in (params.broken, params.healthy) if n is not None and n not in views]
    if unknown:
        return f"models {unknown} are not members of this run ({names})"
    if params.broken is not None and params.healthy is not None:
        pair = (params.broken, params.healthy)
    elif len(names) == 2:
        first, second = (base_name, next(n for n in names if n != base_name)) if base_name in names else names
        broken = params.broken or (second if params.healthy == first else first)
        pair = (broken, params.healthy or next(n for n in names if n != broken))
    else:
        return (
            f"compares two models and this run has {len(names)} ({names}): name them with "
            "params={'interventions.vectors': {'broken': ..., 'healthy': ...}}"
        )
    return pair if pair[0] != pair[1] else f"broken and healthy are the same model ({pair[0]!r})"


def _check_compatible(a: Weights, b: Weights, names: tuple[str, str]) -> None:
    shapes_a = {n: tuple(t.shape) for n, t in a.items()}
    shapes_b = {n: tuple(t.shape) for n, t in b.items()}
    if shapes_a != shapes_b:
        raise NotApplicable(
            f"{names[0]} and {names[1]} do not share one architecture (parameter names or shapes differ)",
            "compare a model with a fine-tune or repair of the same architecture",
        )


class InterventionVectors(ModelSetMetric):
    """The intervention vector v = theta_healthy - theta_broken between two members (a broken and a
    healthy model, or a base and its fine-tune), after aligning the healthy model's MLP units to the
    broken one's by weight matching (``align``: Git Re-Basin, as ``merging.mode_connectivity``; a
    permutation of a block's hidden units leaves the function unchanged). Reported: |v| over all
    parameters and per block (the last entry: parameters outside the blocks), also relative to
    |theta_broken|; the token-mean loss on the run's data (the broken member's batches and loss
    targets) along theta_broken + alpha v for each of ``alphas``; and the layer-wise recovery by block
    transplant, recovery_l = (L(theta_b) - L(theta^(l))) / (L(theta_b) - L(theta_h)), where theta^(l)
    is theta_b with block l's parameters taken from the aligned healthy model. Recovery is undefined
    (left out, with ``recovery_note``) when |L(theta_b) - L(theta_h)| <= ``recovery_tol``.
    The path's alpha = 0 and 1 are the two members' own weights exactly.
    """

    name = "interventions.vectors"
    version = "1"
    summary = "broken -> healthy weight difference after unit alignment: norms, loss path, block-transplant recovery"
    Params = VectorParams
    fields = {
        "pair": "broken -> healthy",
        "vector_norm": "|v| over every parameter",
        "vector_norm_by_layer": "|v| per block, then outside the blocks",
        "relative_norm_by_layer": "|v| / |theta_broken| per block, then outside the blocks",
        "alphas": "the path's points",
        "loss_path": "loss at theta_b + alpha v per alpha (nats)",
        "loss_broken": "L(theta_b)",
        "loss_healthy": "L(theta_h)",
        "recovery": "recovery_l per block (axis block)",
        "best_block": "the block whose transplant recovers most",
        "recovery_note": "why recovery is undefined (only then)",
        "units_moved": "share of MLP units the alignment permuted (align)",
        "vector": "v, float32 [P] (keep_vector)",
    }

    @classmethod
    def uses_data(cls, params: VectorParams) -> bool:
        return True

    @classmethod
    def set_skip_reason(cls, params: VectorParams, views: Mapping[str, ModelView], base_name: str | None) -> str | None:
        pair = resolve_pair(params, views, base_name)
        if isinstance(pair, str):
            return pair
        if params.align:
            try:
                mlp_unit_axes(views[pair[0]], 0)
            except ValueError as exc:
                return f"align=True: {exc}; set align=False to compare the weights as they are"
        for name in pair:
            view = views[name]
            if not view.causal and view.mask_token_id is None:
                return f"{name} is a masked LM without a mask token, so its loss is undefined: save its tokenizer"
        return None

    @classmethod
    def evaluations(cls, params: VectorParams, view: ModelView) -> int:
        """Loss evaluations over the data: broken, healthy, the other path points, one transplant per block."""
        return 2 + len({a for a in params.alphas if a not in (0.0, 1.0)}) + view.n_layers

    @classmethod
    def own_passes(
        cls, params: VectorParams, view: ModelView, shape: RunShape, members: Sequence[str], base_name: str | None
    ) -> dict[str, int]:
        """One forward per loss evaluation and batch with a loss target (``evaluations``)."""
        lengths = [length for _, length, _ in shape.batches] or [shape.seq_len] * shape.n_batches
        batches = sum(1 for length in lengths if has_loss_target(view, length))
        return {"replay_forward": cls.evaluations(params, view) * batches}

    @classmethod
    def cost(cls, params: VectorParams, view: ModelView, shape: RunShape) -> Cost:
        """One path point (a model copy in the parameters' dtype, the last one held to the end), v in
        float32 (``keep_vector``) and with ``align`` the permuted copies of the healthy model's MLP
        weights. The members' own weights are read, not copied; a transplant only points at them.
        Working memory: a loss evaluation's forward of one batch, or the norms' float64 chunks."""
        point = view.param_bytes if any(a not in (0.0, 1.0) for a in params.alphas) else 0
        vector = 4 * view.n_params if params.keep_vector else 0
        aligned = aligned_bytes(view) if params.align else 0
        tokens = shape.n_batches * shape.batch_size * shape.seq_len
        working = max(forward_act_bytes(view, shape.batch_size, shape.seq_len), 4 * 8 * NORM_CHUNK)
        return Cost(state_bytes=point + vector + aligned, transient_bytes=working,
                    flops=2.0 * view.n_params * tokens * cls.evaluations(params, view))

    def setup(self) -> None:
        self.point: Weights = {}
        self.aligned: Weights = {}
        self.vector: torch.Tensor | None = None

    def compute_set(
        self, views: Mapping[str, ModelView], results: Mapping[str, Mapping[str, MetricResult]]
    ) -> dict[str, Any]:
        p: VectorParams = self.params
        pair = resolve_pair(p, views, self.base_name)
        assert not isinstance(pair, str)
        broken, healthy = pair
        view, data = views[broken], self.data[broken]
        a = {n: t.detach() for n, t in view.model.named_parameters()}
        b = {n: t.detach() for n, t in views[healthy].model.named_parameters()}
        _check_compatible(a, b, pair)
        out: dict[str, Any] = {"pair": TextValue(text=f"{broken} -> {healthy}")}
        if p.align:
            unaligned = b
            b, perms = align(view, a, unaligned)
            self.aligned = {n: w for n, w in b.items() if w is not unaligned[n]}
            identity = torch.arange(perms.shape[1]).expand_as(perms)
            out["units_moved"] = ScalarValue(value=float((perms != identity).double().mean()))
        out.update(self._norms(view, a, b))

        def loss(weights: Weights | None) -> float:
            return data_loss(view, weights, data, self.loss_targets)

        loss_b, loss_h = loss(None), loss(b)
        path = []
        for alpha in p.alphas:
            if alpha in (0.0, 1.0):
                path.append(loss_b if alpha == 0.0 else loss_h)
                continue
            self.point = {}  # the previous point goes before the next is made: one copy at a time
            self.point = {n: a[n] + alpha * (b[n] - a[n]) for n in a}
            path.append(loss(self.point))
        owner = group_of(view)
        transplanted = [loss({n: b[n] if owner[n] == layer else a[n] for n in a}) for layer in range(view.n_layers)]
        out.update(
            {
                "alphas": SeriesValue(values=list(p.alphas), index_name="point"),
                "loss_path": SeriesValue(values=[number(x) for x in path], index_name="point"),
                "loss_broken": ScalarValue(value=number(loss_b), unit="nats"),
                "loss_healthy": ScalarValue(value=number(loss_h), unit="nats"),
            }
        )
        gap = loss_b - loss_h
        if abs(gap) <= p.recovery_tol:
            out["recovery_note"] = TextValue(
                text=f"recovery undefined: L(broken) - L(healthy) = {gap:.3g} nats is within recovery_tol "
                f"{p.recovery_tol:g}, so there is no loss gap to recover"
            )
        else:
            recovery = [(loss_b - x) / gap for x in transplanted]
            out["recovery"] = LayerValue(values=[number(r) for r in recovery], axis="block")
            out["best_block"] = ScalarValue(value=float(max(range(len(recovery)), key=recovery.__getitem__)))
        if p.keep_vector:
            self.vector = torch.cat([(b[n] - a[n]).float().reshape(-1) for n in a])
            out["vector"] = self.vector
        return out

    @staticmethod
    def _norms(view: ModelView, a: Weights, b: Weights) -> dict[str, Any]:
        """|v| and |theta_b| per group, streamed ``NORM_CHUNK`` entries at a time (v is never held whole)."""
        owner = group_of(view)
        diff = torch.zeros(view.n_layers + 1, dtype=torch.float64)
        base = torch.zeros(view.n_layers + 1, dtype=torch.float64)
        for n in a:
            flat_a, flat_b = a[n].reshape(-1), b[n].reshape(-1)
            for start in range(0, flat_a.numel(), NORM_CHUNK):  # float64 copies of a chunk, not of the embedding
                chunk_a = flat_a[start:start + NORM_CHUNK].double()
                diff[owner[n]] += (flat_b[start:start + NORM_CHUNK].double() - chunk_a).square().sum().cpu()
                base[owner[n]] += chunk_a.square().sum().cpu()
        relative = torch.where(base > 0, diff / torch.where(base > 0, base, torch.ones_like(base)), float("nan"))
        return {
            "vector_norm": ScalarValue(value=float(diff.sum().sqrt())),
            "vector_norm_by_layer": layer_value(view, diff.sqrt().tolist()),
            "relative_norm_by_layer": layer_value(view, relative.sqrt().tolist()),
        }
