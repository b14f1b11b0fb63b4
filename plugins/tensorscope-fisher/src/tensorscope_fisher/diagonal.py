"""fisher.diagonal: the parameter Fisher's diagonal, true and empirical, with Welford and EMA.

Also ``read_diagonal``, how the plugin's other metrics read its fields back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field
from scipy import stats

from tensorscope_core.plugin_api import (
    Cost,
    Metric,
    MetricResult,
    ModelView,
    Params,
    RunShape,
    ScalarValue,
    Step,
    TensorValue,
)

from .fisher_grads import ARTIFACT, REQUEST, FisherGrads, layout_of, layout_size

Kind = Literal["true", "empirical"]
KINDS: tuple[Kind, ...] = ("true", "empirical")


class DiagonalParams(Params):
    ema_decay: float = Field(0.95, gt=0.0, lt=1.0,
                             description="decay beta of the EMA over batches: ema <- beta ema + (1 - beta) batch mean "
                                         "(K-FAC's stat_decay default)")
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="level of the confidence intervals")


class Welford:
    """Running count, mean and sum of squared deviations of vectors, merged a batch at a time
    (Chan, Golub & LeVeque's pairwise update), plus an EMA of the batch means, all float64."""

    def __init__(self, size: int) -> None:
        self.count = torch.zeros((), dtype=torch.float64)
        self.mean = torch.zeros(size, dtype=torch.float64)
        self.m2 = torch.zeros(size, dtype=torch.float64)
        self.ema = torch.zeros(size, dtype=torch.float64)
        self.batches = torch.zeros((), dtype=torch.float64)

    def add(self, rows: torch.Tensor, decay: float) -> None:
        """Fold in the rows [n, size] of one batch (nothing when n is 0)."""
        n_b = rows.shape[0]
        if n_b == 0:
            return
        mean_b = rows.mean(dim=0)
        m2_b = (rows - mean_b).pow(2).sum(dim=0)
        n_a = float(self.count)
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / n)
        self.m2 += m2_b + delta.pow(2) * (n_a * n_b / n)
        self.count += n_b
        if float(self.batches) == 0:
            self.ema.copy_(mean_b)
        else:
            self.ema.mul_(decay).add_(mean_b, alpha=1 - decay)
        self.batches += 1

    def variance(self) -> torch.Tensor:
        """Unbiased (ddof=1) variance of the rows; NaN with fewer than two."""
        n = float(self.count)
        return self.m2 / (n - 1) if n >= 2 else torch.full_like(self.m2, float("nan"))

    def interval(self, confidence: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Student-t interval of the mean: mean -/+ t_{(1+c)/2, n-1} sqrt(var / n)."""
        n = float(self.count)
        if n < 2:
            nan = torch.full_like(self.mean, float("nan"))
            return nan, nan
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * (self.variance() / n).sqrt()
        return self.mean - half, self.mean + half


class FisherDiagonal(Metric):
    """Diagonal of the parameter Fisher information per example (sequence), true and empirical.

    Per example i, g_i is the gradient of the example's summed token NLL (see the artifact
    ``fisher.per_example_grads``): with labels drawn from the model for the *true* Fisher
    (E[g_i^2] = diag of the sum of the positions' Fishers, the GGN's diagonal), with the
    observed labels for the *empirical* one. ``true/<param>`` is the mean of g_i^2 over the
    examples that have targets, an unbiased estimate; the variance (ddof 1) of g_i^2 across
    examples and a Student-t confidence interval of the mean come from a Welford
    accumulation; the EMA runs over batch means (first batch: its mean; then
    ema <- beta ema + (1 - beta) mean). Per task with tasks. Divide by the mean of the
    examples' target counts for the Fisher per token. Tied parameters appear once, under
    their first name.
    """

    name = "fisher.diagonal"
    version = "1"
    summary = "diagonal parameter Fisher, true (sampled labels) and empirical, Welford mean/variance/CI and EMA"
    Params = DiagonalParams
    artifacts = (ARTIFACT,)
    fields = {
        "true/<param>": "true Fisher diagonal, mean of g_i^2 over examples, shaped like the parameter",
        "empirical/<param>": "empirical Fisher diagonal (observed labels)",
        "<kind>_var/<param>": "unbiased variance of g_i^2 across examples (kind true or empirical)",
        "<kind>_ci_low/<param>, <kind>_ci_high/<param>": "Student-t confidence interval of the mean",
        "<kind>_ema/<param>": "EMA of the batch means of g_i^2",
        "<kind>_trace": "sum of the diagonal (the mean of ||g_i||^2), with CI and n",
        "n_examples": "examples with at least one target",
        "<kind>/<task>/<param>, ..., <kind>_trace/<task>, n_examples/<task>": "the same per task",
    }

    @classmethod
    def artifact_requests(cls, params: Any, view: ModelView) -> dict[str, Any]:
        """Every trainable parameter's scores, with labels drawn from the model and observed."""
        return {ARTIFACT: REQUEST}

    @classmethod
    def cost(cls, params: DiagonalParams, view: ModelView, shape: RunShape) -> Cost:
        segments = 1 + len(shape.tasks)
        size = layout_size(layout_of(view))
        per_kind = (3 * size + 2) * 8 + (3 + 2) * 8  # Welford of g^2 (mean, m2, ema, 2 counters) and of ||g||^2
        squares = shape.batch_size * size * 8  # one batch's g^2, float64
        tokens = shape.n_sequences * shape.seq_len
        # one forward and two pullbacks per example: about (2 + 2 x 4) P flops per token
        return Cost(state_bytes=segments * len(KINDS) * per_kind + squares, flops=10.0 * view.n_params * tokens)

    def setup(self) -> None:
        size = layout_size(layout_of(self.view))
        self.stats: dict[tuple[str | None, str], Welford] = {
            (task, kind): Welford(size) for task in (None, *self.shape.tasks) for kind in KINDS}
        self.norms = {key: Welford(1) for key in self.stats}  # ||g_i||^2, for the trace's interval
        self.squares = torch.zeros(self.shape.batch_size, size, dtype=torch.float64)

    def update(self, step: Step) -> None:
        grads = FisherGrads.of(step[ARTIFACT])
        real = grads.n_targets > 0
        n = int(real.sum())
        for kind in KINDS:
            rows = getattr(grads, kind)[real.to(getattr(grads, kind).device)]
            squares = self.squares[:n]
            squares.copy_(rows.detach())
            squares.pow_(2)
            for task in {None, step.task}:
                self.stats[(task, kind)].add(squares, self.params.ema_decay)
                self.norms[(task, kind)].add(squares.sum(dim=1, keepdim=True), self.params.ema_decay)

    def finalize(self) -> dict[str, Any]:
        layout = layout_of(self.view)
        out: dict[str, Any] = {}
        for (task, kind), acc in self.stats.items():
            seg = "" if task is None else f"{task}/"
            low, high = acc.interval(self.params.confidence)
            for label, flat in ((kind, acc.mean), (f"{kind}_var", acc.variance()), (f"{kind}_ci_low", low),
                                (f"{kind}_ci_high", high), (f"{kind}_ema", acc.ema)):
                for name, (sl, shape) in layout.items():
                    out[f"{label}/{seg}{name}"] = flat[sl].reshape(shape).clone()
            out[f"{kind}_trace" + ("" if task is None else f"/{task}")] = _trace(self.norms[(task, kind)],
                                                                                 self.params.confidence)
            out["n_examples" + ("" if task is None else f"/{task}")] = ScalarValue(value=float(acc.count))
        del self.squares
        return out


def _trace(norms: Welford, confidence: float) -> ScalarValue:
    """The trace (sum of the diagonal) is the mean of ||g_i||^2: its value, interval and n."""
    if float(norms.count) == 0:
        return ScalarValue(value=None, n=0)
    low, high = norms.interval(confidence)
    return ScalarValue(value=float(norms.mean[0]), ci_low=float(low[0]), ci_high=float(high[0]),
                       n=int(norms.count))


TensorOf = Callable[[MetricResult, str], torch.Tensor]


def read_diagonal(view: ModelView, result: MetricResult, tensor_of: TensorOf, kind: Kind = "true",
                  task: str | None = None) -> dict[str, torch.Tensor]:
    """``{parameter name: diagonal}`` (float64, shaped like the parameter) from a fisher.diagonal result."""
    seg = "" if task is None else f"{task}/"
    out = {}
    for name, (_, shape) in layout_of(view).items():
        field = f"{kind}/{seg}{name}"
        value = result.values.get(field)
        if value is None:
            raise KeyError(f"{result.metric} has no field {field!r} (is {task!r} a task of this run?)")
        if isinstance(value, TensorValue):
            out[name] = tensor_of(result, field).double()
        else:
            assert isinstance(value, ScalarValue)
            out[name] = torch.tensor(float("nan") if value.value is None else value.value,
                                     dtype=torch.float64).reshape(shape)
    return out
