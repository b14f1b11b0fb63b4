"""fisher.diagonal: the parameter Fisher's diagonal, true and empirical, with Welford and EMA.

Also ``read_diagonal``, how the plugin's other metrics read its fields back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from scipy import stats

from tensorscope_core.plugin_api import (
    Cost,
    Interpretation,
    Metric,
    MetricResult,
    ModelView,
    Params,
    Rung,
    RunShape,
    ScalarValue,
    Step,
    TensorValue,
    float64_sum_of_squares,
)

from .fisher_grads import ARTIFACT, FisherGrads, layout_of, layout_size, request

Kind = Literal["true", "empirical"]
KINDS: tuple[Kind, ...] = ("true", "empirical")
DTYPES = {"float64": torch.float64, "float32": torch.float32}


class DiagonalParams(Params):
    ema_decay: float = Field(0.95, gt=0.0, lt=1.0,
                             description="decay beta of the EMA over batches: ema <- beta ema + (1 - beta) batch mean "
                                         "(K-FAC's stat_decay default)")
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="level of the confidence intervals")
    kinds: tuple[Kind, ...] = Field(KINDS, min_length=1, description="which Fishers: 'true' (labels drawn from "
                                    "the model), 'empirical' (observed labels)")
    statistics: Literal["full", "mean"] = Field(
        "full", description="'full': mean, variance, confidence interval and EMA per entry (3 vectors and one "
        "batch of squares); 'mean': the mean only (one vector), the trace keeps its interval")
    per_task: bool = Field(True, description="also the fields per task (one more set of vectors per task)")
    dtype: Literal["float64", "float32"] = Field("float64", description="dtype of the per-entry accumulators")


class Welford:
    """Running count, mean and sum of squared deviations of vectors, merged a batch at a time
    (Chan, Golub & LeVeque's pairwise update), plus an EMA of the batch means (``dtype``, float64 by
    default; the counters always float64)."""

    def __init__(self, size: int, dtype: torch.dtype = torch.float64) -> None:
        self.count = torch.zeros((), dtype=torch.float64)
        self.mean = torch.zeros(size, dtype=dtype)
        self.m2 = torch.zeros(size, dtype=dtype)
        self.ema = torch.zeros(size, dtype=dtype)
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


class Mean:
    """Running count and sum of vectors, one row at a time (no batch buffer): the mean only."""

    def __init__(self, size: int, dtype: torch.dtype) -> None:
        self.count = torch.zeros((), dtype=torch.float64)
        self.total = torch.zeros(size, dtype=dtype)
        self._divided = False

    def add_squares(self, rows: torch.Tensor) -> None:
        """Fold in the squares of ``rows`` [n, size], a row at a time."""
        for row in rows:
            self.total.addcmul_(row, row)
        self.count += rows.shape[0]

    def add_sum(self, squares: torch.Tensor, n: int) -> None:
        """Fold in the squares of ``n`` rows already summed (``squares`` [size])."""
        self.total += squares.to(self.total.device)
        self.count += n

    @property
    def mean(self) -> torch.Tensor:
        """The sum over the count, made in place of the sum (finalize reads it once; a second P-vector beside
        the sum would be the largest thing a large model's diagonal holds)."""
        n = float(self.count)
        if not self._divided:
            if n:
                self.total.div_(n)
            else:
                self.total.fill_(float("nan"))
            self._divided = True
        return self.total


def summed_squares(params: DiagonalParams) -> bool:
    """Whether the metric asks the artifact for the squares summed over each batch, not the rows: the mean
    alone in float32, which the artifact's float32 sums serve (the float64 or full statistics need rows)."""
    return params.statistics == "mean" and params.dtype == "float32"


def segments(params: DiagonalParams, tasks: Sequence[str]) -> tuple[str | None, ...]:
    """None (pooled) and, with ``per_task``, each task."""
    return (None, *tasks) if params.per_task else (None,)


def state_bytes(params: DiagonalParams, size: int, shape: RunShape) -> int:
    """Per kind and segment: 3 vectors (full) or 1 (mean) of ``dtype`` and the trace's float64 Welford;
    full mode also one batch of squares."""
    width = torch.finfo(DTYPES[params.dtype]).bits // 8
    full = params.statistics == "full"
    per_kind = (3 if full else 1) * size * width + (2 if full else 1) * 8 + (3 + 2) * 8
    squares = shape.batch_size * size * width if full else 0
    return len(segments(params, shape.tasks)) * len(params.kinds) * per_kind + squares


def output_bytes(params: DiagonalParams, size: int, shape: RunShape) -> int:
    """What finalize adds to the state: every kind's and segment's fields (mean, and in full mode the
    variance, CI ends and EMA), each a P-vector of ``dtype`` that the run keeps as a result, plus the flat
    vectors computed before they are cut into parameters: in full mode an accumulator's variance and CI
    ends (its mean and EMA are the state itself); in mean mode none (the mean is made in place of the sum)."""
    width = torch.finfo(DTYPES[params.dtype]).bits // 8
    full = params.statistics == "full"
    keys = len(segments(params, shape.tasks)) * len(params.kinds)
    return (keys * (5 if full else 1) + (3 if full else 0)) * size * width


def result_bytes(params: DiagonalParams, size: int, shape: RunShape) -> int:
    """The fields the run keeps: per kind and segment the mean, and in full mode the variance, CI ends and
    EMA, each a P-vector of ``dtype`` (copies: finalize clones every field)."""
    width = torch.finfo(DTYPES[params.dtype]).bits // 8
    keys = len(segments(params, shape.tasks)) * len(params.kinds)
    return keys * (5 if params.statistics == "full" else 1) * size * width


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
    supports_dispatch = True  # reads the core's per-example gradients only, which load a dispatched model's weights
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
        """Every trainable parameter's scores, with the label sets of the Fishers it makes (``kinds``); their
        squares summed over each batch instead, for the mean alone in float32 (``summed_squares``)."""
        return {ARTIFACT: request(params.kinds, squares=summed_squares(params))}

    @classmethod
    def cost(cls, params: DiagonalParams, view: ModelView, shape: RunShape) -> Cost:
        tokens = shape.n_sequences * shape.seq_len
        size = layout_size(layout_of(view))
        # a masked LM's batch may hold rows without a masked token: update copies the rows that have one
        copy = 0 if view.causal or summed_squares(params) else shape.batch_size * size * view.dtype_bytes
        # one forward and two pullbacks per example: about (2 + 2 x 4) P flops per token
        return Cost(state_bytes=state_bytes(params, size, shape), flops=10.0 * view.n_params * tokens,
                    transient_bytes=copy, finalize_bytes=output_bytes(params, size, shape),
                    result_bytes=result_bytes(params, size, shape))

    @classmethod
    def ladder(cls, params: DiagonalParams, view: ModelView, shape: RunShape) -> Sequence[Rung]:
        """float32 accumulators, the mean only, the true Fisher only, then no per-task fields; each rung
        keeps the ones before it and is offered only where it holds less. The per-task means go last: the
        per-task masks, their overlap and the grouped sums read them, nothing reads the variances."""
        steps: list[tuple[str, dict[str, Any], str]] = [
            ("float32", {"dtype": "float32"}, "float32 accumulators: entries off by float32 rounding (~1e-6 of "
             "the parameter's largest; CI ends, differences, may lose more where they nearly cancel)"),
            ("mean-only", {"statistics": "mean"}, "float32; the mean only: no per-entry variance, confidence "
             "interval or EMA (the trace keeps its interval)"),
            ("true-only", {"kinds": ("true",)}, "float32, mean only; the true Fisher only (no empirical fields)"),
            ("pooled", {"per_task": False}, "float32, mean only, true Fisher only; no per-task fields (pooled "
             "over tasks only)"),
        ]
        out: list[Rung] = []
        size = layout_size(layout_of(view))
        last, current = state_bytes(params, size, shape), params
        for name, update, accuracy in steps:
            current = current.model_copy(update=update)
            held = state_bytes(current, size, shape)
            if held < last:
                out.append(Rung(name, current, accuracy))
                last = held
        return out

    @classmethod
    def interpret(cls, result: MetricResult) -> list[Interpretation]:
        """Which running estimate to read for which purpose (README: "Welford or EMA")."""
        decay = float(result.params.get("ema_decay", 0.95))
        n = result.value("n_examples")
        if "true_ema/" not in "".join(result.values) and "empirical_ema/" not in "".join(result.values):
            return [Interpretation(text=f"the mean fields (Welford over all {n:.0f} examples) are the Fisher "
                                        "of the whole run: use them for importance masks and Fisher merging")]
        return [Interpretation(text=f"importance masks / Fisher merging over a run: read <kind>/<param>, the "
                                    f"Welford mean over all {n:.0f} examples with equal weight; tracking a "
                                    f"model that drifts during training: read <kind>_ema/<param>, decay "
                                    f"{decay:g}, effective window 1/(1 - decay) = {1 / (1 - decay):.3g} batches")]

    def setup(self) -> None:
        size = layout_size(layout_of(self.view))
        dtype = DTYPES[self.params.dtype]
        keys = [(task, kind) for task in segments(self.params, self.shape.tasks) for kind in self.params.kinds]
        self.stats: dict[tuple[str | None, str], Welford | Mean] = {
            key: Welford(size, dtype) if self.params.statistics == "full" else Mean(size, dtype) for key in keys}
        self.norms = {key: Welford(1) for key in self.stats}  # ||g_i||^2, for the trace's interval
        full = self.params.statistics == "full"
        self.squares = torch.zeros(self.shape.batch_size if full else 0, size, dtype=dtype)

    def update(self, step: Step) -> None:
        grads = FisherGrads.of(step[ARTIFACT])
        real = grads.n_targets > 0
        n = int(real.sum())
        tasks = {None, step.task} if self.params.per_task else {None}
        for kind in self.params.kinds:
            if summed_squares(self.params):  # the artifact's sums (an example without a target adds zeros)
                total, example_norms = grads.summed[kind]
                norms = example_norms[real.cpu()].reshape(-1, 1)
                for task in tasks:
                    self.norms[(task, kind)].add(norms, self.params.ema_decay)
                    acc = self.stats[(task, kind)]
                    assert isinstance(acc, Mean)
                    acc.add_sum(total, n)
                continue
            rows = grads.scores(kind).detach()
            if n < len(rows):  # a copy of the rows with a target only where some have none
                rows = rows[real.to(rows.device)]
            norms = row_norms(rows)
            for task in tasks:
                self.norms[(task, kind)].add(norms, self.params.ema_decay)
                acc = self.stats[(task, kind)]
                if isinstance(acc, Mean):
                    acc.add_squares(rows)
                    continue
                squares = self.squares[:n]
                squares.copy_(rows)
                squares.pow_(2)
                acc.add(squares, self.params.ema_decay)

    def finalize(self) -> dict[str, Any]:
        layout = layout_of(self.view)
        out: dict[str, Any] = {}
        for (task, kind), acc in self.stats.items():
            seg = "" if task is None else f"{task}/"
            for label, flat in _fields(kind, acc, self.params.confidence):
                for name, (sl, shape) in layout.items():
                    out[f"{label}/{seg}{name}"] = flat[sl].reshape(shape).clone()
            out[f"{kind}_trace" + ("" if task is None else f"/{task}")] = _trace(self.norms[(task, kind)],
                                                                                 self.params.confidence)
            out["n_examples" + ("" if task is None else f"/{task}")] = ScalarValue(value=float(acc.count))
        del self.squares
        return out


def row_norms(rows: torch.Tensor) -> torch.Tensor:
    """||g_i||^2 of each row [n, 1] in float64 (the trace's per-example values), a row at a time and each
    in float64 chunks (a float64 copy of a row would be twice the row)."""
    out = torch.zeros(len(rows), 1, dtype=torch.float64)
    for i, row in enumerate(rows):
        out[i] = float64_sum_of_squares(row).cpu()
    return out


def _fields(kind: str, acc: Welford | Mean, confidence: float) -> list[tuple[str, torch.Tensor]]:
    """(field label, flat vector) of one accumulator: the mean, and for Welford the variance, CI and EMA."""
    if isinstance(acc, Mean):
        return [(kind, acc.mean)]
    low, high = acc.interval(confidence)
    return [(kind, acc.mean), (f"{kind}_var", acc.variance()), (f"{kind}_ci_low", low),
            (f"{kind}_ci_high", high), (f"{kind}_ema", acc.ema)]


def _trace(norms: Welford, confidence: float) -> ScalarValue:
    """The trace (sum of the diagonal) is the mean of ||g_i||^2: its value, interval and n."""
    if float(norms.count) == 0:
        return ScalarValue(value=None, n=0)
    low, high = norms.interval(confidence)
    return ScalarValue(value=float(norms.mean[0]), ci_low=float(low[0]), ci_high=float(high[0]),
                       n=int(norms.count))


TensorOf = Callable[[MetricResult, str], torch.Tensor]


def diagonal_tasks(result: MetricResult, tasks: Sequence[str]) -> tuple[str, ...]:
    """The run's ``tasks`` a fisher.diagonal result has fields for: none when it ran pooled only (its
    ``pooled`` memory rung, or ``per_task=False``)."""
    return tuple(tasks) if result.params.get("per_task", True) else ()


def diagonal_kinds(result: MetricResult) -> tuple[Kind, ...]:
    """The Fishers a fisher.diagonal result has fields for: the true one only at its ``true-only`` rung."""
    return tuple(result.params.get("kinds", KINDS))


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
