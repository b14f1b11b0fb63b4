"""interventions.null_space: task B's gradient projected off the span of task A's gradients (OGD / GPM)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    ExampleGrads,
    Metric,
    ModelView,
    NotApplicable,
    Params,
    PreparedData,
    RunShape,
    ScalarValue,
    SeriesValue,
    Step,
    TextValue,
    example_grads_layout,
)

from .groups import group_spans, layer_value, number
from .projection import CHUNK, ProjectionStats, RowSpace, add_column_sums, projection_stats, span_size
from .tasks import data_tasks, pick_tasks, task_rows

ARTIFACT = "per_example_grads"
LANCZOS = "fisher.lanczos"


class NullSpaceParams(Params):
    basis: Literal["examples", "fisher.lanczos"] = Field(
        "examples",
        description="'examples': the per-example gradients of the protected task; 'fisher.lanczos': "
        "the eigenvectors fisher.lanczos returns (run it with keep_vectors=True)",
    )
    protected: str | None = Field(
        None, description="task A, whose gradients are protected (default: the run's first task; basis='examples' only)"
    )
    target: str | None = Field(
        None,
        description="task B, whose mean gradient is projected (default: the run's "
        "second task; with basis='fisher.lanczos' and untasked data: all)",
    )
    max_protected: int | None = Field(
        256, ge=1, description="the first this many examples of task A span the protected space (None: all)"
    )
    rank_rtol: float = Field(
        1e-10,
        gt=0.0,
        lt=1.0,
        description="Gram eigenvalues at most rank_rtol x the largest are dropped from the basis (numerical rank)",
    )
    saved: Literal["global", "layer"] = Field(
        "global",
        description="which projected direction 'projected' holds: the whole-model projection or the "
        "concatenated per-layer (GPM-style) ones",
    )


def _planned_rows(params: NullSpaceParams, shape: RunShape) -> int:
    """Protected rows the run's batches can give: task A's rows up to ``max_protected`` (0 with the
    Lanczos basis)."""
    if params.basis == LANCZOS:
        return 0
    chosen = _resolve(params, list(shape.tasks))
    n = task_rows(shape, chosen[0] if isinstance(chosen, tuple) else None)
    return n if params.max_protected is None else min(n, params.max_protected)


def _resolve(params: NullSpaceParams, tasks: list[str]) -> tuple[str | None, str | None] | str:
    """(protected task, target task), or why they cannot be chosen."""
    if params.basis == LANCZOS:
        if params.target is None:
            return None, (tasks[1] if len(tasks) >= 2 else tasks[0] if tasks else None)
        return (
            (None, params.target)
            if params.target in tasks
            else f"target task {params.target!r} is not a task of this run ({tasks})"
        )
    return pick_tasks(params.protected, params.target, tasks)


class NullSpace(Metric):
    """Task B's mean gradient g_B projected onto the orthogonal complement of the span of the protected
    task A's per-example gradients (orthogonal gradient descent, Farajtabar et al. 2020; gradient
    projection memory, Saha et al. 2021).

    G_A [n, P]: the gradient of each example's mean token loss (the core's shared ``per_example_grads``
    artifact, observed labels, every trainable parameter) for the first ``max_protected`` examples of
    task A. g_B: the gradient of task B's token-mean loss (summed per-example gradients of the summed
    token NLL over all of B's targets). The orthonormal basis Q of the row space of G_A comes from the
    float64 n x n Gram matrix G_A G_A^T (``torch.linalg.eigh``; eigenvalues at most ``rank_rtol`` x the
    largest are dropped: ``rank``, ``rank_threshold``); P g = g - Q (Q^T g) is applied as
    g - G_A^T (C C^T G_A g), never forming Q or the P x P projector. Reported for the whole model and per
    block (each block's own basis from its columns of G_A, as GPM projects layer-wise; the last entry is
    the parameters outside the blocks): ``removed_fraction`` |Q Q^T g_B|^2 / |g_B|^2, ``cosine``
    cos(g_B, P g_B), ``max_abs_dot`` max_i |g_A,i . P g_B| (~0: the projected step leaves every protected
    example's loss unchanged to first order). With ``basis='fisher.lanczos'`` the protected rows are
    ``fisher.lanczos``'s eigenvectors (top-k Fisher directions) instead of task A's gradients.
    """

    name = "interventions.null_space"
    supports_dispatch = True  # reads the core's per-example gradients only
    version = "1"
    summary = "task B's gradient projected off task A's per-example gradient span (Gram-based, per layer)"
    Params = NullSpaceParams
    artifacts = (ARTIFACT,)
    fields = {
        "removed_fraction": "|Q Q^T g_B|^2 / |g_B|^2: the share of g_B's squared norm in the protected span",
        "cosine": "cos(g_B, P g_B)",
        "max_abs_dot": "max over protected rows of |g_A,i . P g_B| (~0)",
        "max_abs_dot_relative": "the same divided by |g_A,i| |g_B|",
        "rank": "dimension of the protected span (Gram eigenvalues above the threshold)",
        "rank_threshold": "eigenvalues at or below this were dropped (rank_rtol x the largest)",
        "eigenvalues": "the Gram matrix's eigenvalues, descending",
        "removed_fraction_by_layer, cosine_by_layer, max_abs_dot_by_layer, rank_by_layer": (
            "the same per block with each block's own basis, then the parameters outside the blocks"
        ),
        "target_grad_norm": "|g_B|",
        "n_protected": "protected rows (task A examples with a target, or Lanczos eigenvectors)",
        "basis": "what spans the protected space",
        "projected": "P g_B, float32 [P] in named_parameters order (saved='global'), or per layer ('layer')",
    }

    @classmethod
    def metric_needs(cls, params: NullSpaceParams) -> tuple[str, ...]:
        return (LANCZOS,) if params.basis == LANCZOS else ()

    @classmethod
    def skip_reason(cls, params: NullSpaceParams, view: ModelView, data: PreparedData | None) -> str | None:
        chosen = _resolve(params, data_tasks(data))
        return chosen if isinstance(chosen, str) else None

    @classmethod
    def artifact_requests(cls, params: NullSpaceParams, view: ModelView) -> dict[str, Mapping[str, Any]]:
        return {ARTIFACT: {"parameters": None, "labels": ("observed",)}}

    @classmethod
    def cost(cls, params: NullSpaceParams, view: ModelView, shape: RunShape) -> Cost:
        """State: the protected rows in the model's dtype (the first ``max_protected`` rows of task A; none
        with the Lanczos basis, whose vectors are the dependency's), g_B's float64 sum and the protected
        rows' target counts. Update: one column chunk of a batch's gradients in float64 (g_B's sum).
        Finalize: the float64 projection P g beside its float32 copy (the result), or later the result
        beside one layer's gradient and projection, plus one column chunk of the rows in float64.
        FLOPs: the Gram (2 n^2 P) and the two passes of each projection, whole and per layer."""
        size = sum(p.numel() for p in view.model.parameters() if p.requires_grad)
        n = _planned_rows(params, shape)
        chunk = min(CHUNK, size)
        result = 4 * size
        whole = 8 * size + (result if params.saved == "global" else 0)
        # a layer's g (copied when its columns are not adjacent) and its projection, in float64
        layer = max(
            (8 * span_size(group) * (1 + (len(group) > 1)) for group in group_spans(view, example_grads_layout(view))),
            default=0,
        )
        return Cost(
            state_bytes=n * size * view.dtype_bytes + 8 * size + 8 * n,
            transient_bytes=8 * (shape.batch_size + 1) * chunk,
            finalize_bytes=max(whole, result + layer) + 8 * (n + 1) * chunk,
            result_bytes=result,
            flops=float(2 * (2 * n * n * size + 8 * n * size)),
        )

    def setup(self) -> None:
        chosen = _resolve(self.params, list(self.shape.tasks))
        assert not isinstance(chosen, str)
        self.protected, self.target = chosen
        # task A's per-example gradients in the model's dtype: the first ``n_rows`` rows of a buffer
        # sized once from the run's shape, so rows are copied in one at a time and never joined
        self.rows: torch.Tensor | None = None
        self.n_rows = 0
        self.protected_targets = torch.zeros(0, dtype=torch.float64)
        self.target_sum: torch.Tensor | None = None  # sum of B's summed-NLL gradients, float64 [P]
        self.target_tokens = 0.0
        self.target_examples = 0

    def update(self, step: Step) -> None:
        grads: ExampleGrads = step[ARTIFACT]
        with_targets = grads.n_targets > 0
        if self.params.basis != LANCZOS and step.task == self.protected:
            self._keep_protected(grads)
        if self.target is None or step.task == self.target:
            flat = grads.of("observed")
            if self.target_sum is None:
                self.target_sum = torch.zeros(flat.shape[1], dtype=torch.float64)
            add_column_sums(self.target_sum, flat.detach())
            self.target_tokens += float(grads.n_targets.sum())
            self.target_examples += int(with_targets.sum())

    def _keep_protected(self, grads: ExampleGrads) -> None:
        """Copy the batch's examples with a target (up to ``max_protected`` in all) into the row buffer,
        each divided by its target count: ``grads.mean_observed()`` without its [batch, P] copies."""
        picked = (grads.n_targets > 0).nonzero().flatten().cpu()
        if self.params.max_protected is not None:
            picked = picked[: max(self.params.max_protected - self.n_rows, 0)]
        if not len(picked):
            return
        flat = grads.of("observed").detach()
        rows = self._room_for(len(picked), flat)
        for k, i in enumerate(picked.tolist()):
            rows[self.n_rows + k].copy_(flat[i])
        counts = grads.n_targets[picked]
        new = rows[self.n_rows : self.n_rows + len(picked)]
        new.div_(counts.clamp(min=1).to(dtype=new.dtype)[:, None])
        self.n_rows += len(picked)
        self.protected_targets = torch.cat([self.protected_targets, counts.to(torch.float64)])

    def _room_for(self, count: int, like: torch.Tensor) -> torch.Tensor:
        """The row buffer with room for ``count`` more rows: sized once from the run's shape (the declared
        state), grown only where the batches hold more rows than the shape said."""
        need = self.n_rows + count
        if self.rows is None or self.rows.shape[0] < need:
            grown = torch.empty(max(need, _planned_rows(self.params, self.shape)), like.shape[1], dtype=like.dtype)
            if self.rows is not None:
                grown[: self.n_rows] = self.rows[: self.n_rows]
            self.rows = grown
        return self.rows

    def _protected_rows(self) -> tuple[torch.Tensor, str]:
        if self.params.basis != LANCZOS:
            if self.rows is None or not self.n_rows:
                raise NotApplicable(
                    f"task {self.protected!r} has no example with a loss target",
                    "give it sequences of at least two tokens (causal) or a tokenizer with a mask token (encoders)",
                )
            return self.rows[: self.n_rows], f"per-example gradients of task {self.protected!r}"
        lanczos = self.deps[LANCZOS]
        if "eigenvectors" not in lanczos.values:
            raise NotApplicable(
                "fisher.lanczos kept no eigenvectors", "run it with params={'fisher.lanczos': {'keep_vectors': True}}"
            )
        vectors = self.tensor_of(lanczos, "eigenvectors")
        if lanczos.params.get("layers") is not None:
            raise NotApplicable(
                "fisher.lanczos ran on some layers only, so its eigenvectors do not cover every parameter",
                "run it with layers=None",
            )
        return vectors.T, f"{vectors.shape[1]} eigenvectors of fisher.lanczos"

    def finalize(self) -> dict[str, Any]:
        if self.target_sum is None or self.target_tokens == 0:
            raise NotApplicable(
                f"task {self.target!r} has no loss target, so it has no gradient",
                "give it sequences of at least two tokens (causal) or a tokenizer with a mask token",
            )
        g = self.target_sum.div_(self.target_tokens)  # in place: no second float64 [P]
        self.target_tokens = 1.0  # what target_sum now holds is the mean
        rows, basis = self._protected_rows()
        if rows.shape[1] != g.shape[0]:
            raise NotApplicable(
                f"the protected vectors have {rows.shape[1]} entries and the gradient {g.shape[0]}",
                "use fisher.lanczos over every trainable parameter",
            )
        size = g.shape[0]
        whole = RowSpace.of(rows, [slice(0, size)], self.params.rank_rtol)
        projected = whole.project(g)
        total = projection_stats(whole, g, projected)
        layered = self.params.saved == "layer"
        # the float64 projection is dropped before the per-layer work: only the float32 result stays
        saved = torch.zeros(size, dtype=torch.float32) if layered else projected.float()
        del projected
        per_layer = [
            self._layer_stats(rows, g, group, saved if layered else None)
            for group in group_spans(self.view, example_grads_layout(self.view))
        ]

        def by_layer(attr: str) -> Any:
            return layer_value(self.view, [float("nan") if s is None else getattr(s, attr) for s in per_layer])

        return {
            "removed_fraction": ScalarValue(value=number(total.removed_fraction)),
            "cosine": ScalarValue(value=number(total.cosine)),
            "max_abs_dot": ScalarValue(value=total.max_abs_dot),
            "max_abs_dot_relative": ScalarValue(value=total.max_abs_dot_relative),
            "rank": ScalarValue(value=total.rank),
            "rank_threshold": ScalarValue(value=total.threshold),
            "eigenvalues": SeriesValue(values=whole.eigenvalues.tolist(), index_name="rank"),
            "removed_fraction_by_layer": by_layer("removed_fraction"),
            "cosine_by_layer": by_layer("cosine"),
            "max_abs_dot_by_layer": by_layer("max_abs_dot"),
            "rank_by_layer": by_layer("rank"),
            "target_grad_norm": ScalarValue(value=float(g.norm()), n=self.target_examples),
            "n_protected": ScalarValue(value=int(rows.shape[0])),
            "basis": TextValue(text=basis),
            "projected": saved,
        }

    def _layer_stats(
        self, rows: torch.Tensor, g: torch.Tensor, group: list[slice], layered: torch.Tensor | None
    ) -> ProjectionStats | None:
        """One block's projection with its own basis (None for an empty group); its projected columns
        are written into ``layered`` when given."""
        if span_size(group) == 0:
            return None
        part = g[group[0]] if len(group) == 1 else torch.cat([g[s] for s in group])
        space = RowSpace.of(rows, group, self.params.rank_rtol)
        moved = space.project(part)
        if layered is not None:
            offset = 0
            for s in group:
                layered[s].copy_(moved[offset : offset + s.stop - s.start])
                offset += s.stop - s.start
        return projection_stats(space, part, moved)
