"""fisher.triangulation: trace and top eigenvalues of the curvature from every estimator the run computed,
side by side, with their pairwise ratios and which agree (the documents' "curvature triangulation")."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    Interpretation,
    Metric,
    MetricResult,
    ModelView,
    Params,
    RunShape,
    ScalarValue,
    SeriesValue,
    TableValue,
)

from .diagonal import KINDS, read_diagonal

Estimator = Literal[
    "fisher.diagonal", "fisher.grouped", "fisher.kfac", "fisher.lanczos", "hessian.lanczos", "fisher.spectrum"
]
ESTIMATORS: tuple[Estimator, ...] = (
    "fisher.diagonal",
    "fisher.grouped",
    "fisher.kfac",
    "fisher.lanczos",
    "hessian.lanczos",
    "fisher.spectrum",
)
MATRIX = {
    "true": "true Fisher",
    "empirical": "empirical Fisher",
    "sampled": "true Fisher",
    "observed": "empirical Fisher",
}
ALL = "all trainable"
ESTIMATE, LOWER = "estimate", "lower bound"
ROW_COLUMNS = [
    "estimator",
    "matrix",
    "parameters",
    "normalisation",
    "n_examples",
    "trace",
    "top1",
    "top1_kind",
    "accuracy",
]
PAIR_COLUMNS = ["quantity", "a", "b", "ratio", "verdict"]


class TriangulationParams(Params):
    estimators: tuple[Estimator, ...] = Field(
        ESTIMATORS,
        min_length=1,
        description="the curvature metrics to compare (each runs, with its own "
        "parameters, if the run does not already hold it); the others are listed as missing",
    )
    rtol: float = Field(
        0.2,
        gt=0.0,
        description="two estimates of the same quantity agree when their ratio is "
        "within 1 ± rtol; a lower bound is consistent when at most (1 + rtol) x the estimate",
    )


@dataclass
class Row:
    """One estimator's figures on the common scale (per sequence unless ``normalisation`` says otherwise)."""

    estimator: str
    matrix: str
    parameters: str
    normalisation: str
    n_examples: float | None
    trace: float | None
    top1: float | None
    top1_kind: str
    accuracy: str
    topk: list[float] = field(default_factory=list)

    def cells(self) -> list[Any]:
        return [
            self.estimator,
            self.matrix,
            self.parameters,
            self.normalisation,
            self.n_examples,
            self.trace,
            self.top1,
            self.top1_kind,
            self.accuracy,
        ]


def _value(result: MetricResult, name: str) -> float | None:
    value = result.values.get(name)
    return None if value is None else result.value(name)


def _table(result: MetricResult, name: str) -> TableValue:
    value = result.values[name]
    assert isinstance(value, TableValue), f"{result.metric}.{name} is not a table"
    return value


def _flat(values: Any) -> list[float]:
    """The numbers of a LayerValue / HeadValue grid, nulls left out."""
    if isinstance(values, list):
        return [x for v in values for x in _flat(v)]
    return [] if values is None else [float(values)]


class Triangulation(Metric):
    """Trace and top eigenvalue(s) of the curvature from each estimator the run computed, on one scale, and
    which agree.

    Rows (each from the named metric's result, never recomputed): ``fisher.diagonal`` (true and
    empirical: trace = mean ||g_i||², top-1 the largest diagonal entry, a lower bound of λ_max), the
    diagonal summed over the K-FAC modules' parameters (the exact-in-expectation counterpart of K-FAC's
    trace), ``fisher.grouped`` (Σ block + outside: the same trace regrouped), ``fisher.kfac``
    (Σ tr A tr G and max a_max g_max, per token position in K-FAC, multiplied by positions / sequences
    to be per sequence), ``fisher.lanczos`` / ``hessian.lanczos`` (λ_max and the top k; per sequence
    with ``per='example'``, per token otherwise), ``fisher.spectrum`` (Σ of the head and MLP block
    traces when heads share no key/value entries; top-1 the largest block eigenvalue, a lower bound of
    the full λ_max by Cauchy interlacing). Each row says its matrix (true Fisher, empirical Fisher,
    Hessian), parameters and normalisation. For every pair of rows holding the same quantity: the ratio
    and a verdict: ``agree`` / ``disagree`` (two estimates of the same matrix, parameters and scale,
    ratio within 1 ± ``rtol``), ``consistent`` / ``inconsistent`` (a lower bound at most (1 + rtol) x an
    estimate over a superset of its parameters), or ``not comparable`` with the reason. An estimator
    not in ``estimators`` is listed in ``missing``, never as a 0. Rows built on different examples
    (``n_examples``: Lanczos and the spectrum keep their first ``max_examples``) agree only within
    sampling error.
    """

    name = "fisher.triangulation"
    supports_dispatch = True  # reads its needed metrics' results only
    version = "1"
    summary = "curvature triangulation: trace and top eigenvalues from diagonal, grouped, K-FAC, Lanczos, spectrum"
    Params = TriangulationParams
    derived_from = ESTIMATORS
    fields = {
        "estimates": "table: " + ", ".join(ROW_COLUMNS),
        "pairs": "table: quantity (trace, top1), a, b, ratio a / b, verdict",
        "missing": "table: estimator, reason (estimators not asked)",
        "topk/<estimator>": "the top-k eigenvalues of a Lanczos row, descending",
        "n_agree, n_disagree": "pairs that agree / are consistent, and that disagree / are inconsistent",
    }

    @classmethod
    def metric_needs(cls, params: TriangulationParams) -> tuple[str, ...]:
        return tuple(dict.fromkeys(params.estimators))

    @classmethod
    def cost(cls, params: TriangulationParams, view: ModelView, shape: RunShape) -> Cost:
        return Cost(state_bytes=0)  # reads the estimators' results in finalize, holds nothing

    def finalize(self) -> dict[str, Any]:
        rows: list[Row] = []
        for name in self.params.estimators:
            rows.extend(getattr(self, "_" + name.replace(".", "_"))(self.deps[name]))
        pairs = [
            pair
            for quantity in ("trace", "top1")
            for a, b in itertools.combinations(rows, 2)
            if (pair := _pair(quantity, a, b, self.params.rtol)) is not None
        ]
        out: dict[str, Any] = {
            "estimates": TableValue(columns=ROW_COLUMNS, rows=[r.cells() for r in rows]),
            "pairs": TableValue(columns=PAIR_COLUMNS, rows=pairs),
            "missing": TableValue(
                columns=["estimator", "reason"],
                rows=[
                    [m, "not asked: add it to fisher.triangulation's estimators"]
                    for m in ESTIMATORS
                    if m not in self.params.estimators
                ],
            ),
            "n_agree": ScalarValue(value=float(sum(p[-1] in ("agree", "consistent") for p in pairs))),
            "n_disagree": ScalarValue(value=float(sum(p[-1] in ("disagree", "inconsistent") for p in pairs))),
        }
        for row in rows:
            if row.topk:
                out[f"topk/{row.estimator}"] = SeriesValue(values=row.topk, index_name="rank")
        return out

    def _fisher_diagonal(self, result: MetricResult) -> list[Row]:
        rows = []
        kfac = self.deps.get("fisher.kfac")
        kfac_kind = (
            None if kfac is None else ("true" if kfac.params.get("labels", "sampled") == "sampled" else "empirical")
        )
        n = _value(result, "n_examples")
        for kind in KINDS:
            if f"{kind}_trace" not in result.values:
                continue
            diag = read_diagonal(self.view, result, self.tensor_of, kind)
            top = max(float(d.max()) for d in diag.values())
            rows.append(
                Row(
                    f"fisher.diagonal ({kind})",
                    MATRIX[kind],
                    ALL,
                    "per sequence",
                    n,
                    _value(result, f"{kind}_trace"),
                    top,
                    LOWER,
                    "trace: mean of ||g_i||² (exact for the empirical Fisher; the true one sampled, CI in "
                    "fisher.diagonal); top1: the largest diagonal entry",
                )
            )
            if kind == kfac_kind and kfac is not None:
                params = {f"{row[0]}.{p}" for row in _table(kfac, "capacity").rows for p in ("weight", "bias")}
                trace = sum(float(d.sum()) for p, d in diag.items() if p in params)
                rows.append(
                    Row(
                        f"fisher.diagonal ({kind}, K-FAC modules)",
                        MATRIX[kind],
                        "K-FAC modules",
                        "per sequence",
                        n,
                        trace,
                        None,
                        ESTIMATE,
                        "the diagonal summed over the K-FAC modules' weights and biases",
                    )
                )
        return rows

    def _fisher_grouped(self, result: MetricResult) -> list[Row]:
        rows = []
        for kind in KINDS:
            if f"{kind}/block" not in result.values:
                continue
            trace = sum(_flat(result.value(f"{kind}/block"))) + result.value(f"{kind}/outside")
            rows.append(
                Row(
                    f"fisher.grouped ({kind})",
                    MATRIX[kind],
                    ALL,
                    "per sequence",
                    None,
                    trace,
                    None,
                    ESTIMATE,
                    "fisher.diagonal regrouped: Σ block + outside equals its trace up to rounding",
                )
            )
        return rows

    def _fisher_kfac(self, result: MetricResult) -> list[Row]:
        positions = result.value("n_examples")
        scale = positions / self.shape.n_sequences
        capacity = _table(result, "capacity")
        eigmax = capacity.columns.index("eigmax")
        top = max(float(r[eigmax]) for r in capacity.rows)
        return [
            Row(
                "fisher.kfac",
                MATRIX[result.params.get("labels", "sampled")],
                "K-FAC modules",
                "per sequence",
                positions,
                sum(_flat(result.value("trace"))) * scale,
                top * scale,
                ESTIMATE,
                "Σ tr A · tr G and max a_max g_max of the block-diagonal A ⊗ G (K-FAC's independence of ā "
                f"and g), per token position x {scale:.4g} positions per sequence",
            )
        ]

    def _lanczos(self, result: MetricResult, estimator: str, matrix: str) -> list[Row]:
        layers = result.params.get("layers")
        per = result.params.get("per", "example")
        bounds = "residual_norms" if "residual_norms" in result.values else "residual_bounds"
        residual = max(_flat(result.value(bounds)))
        top = result.value("eigenvalues")
        return [
            Row(
                estimator,
                matrix,
                ALL if layers is None else f"layers {list(layers)}",
                "per sequence" if per == "example" else "per token",
                _value(result, "n_examples"),
                None,
                top[0],
                ESTIMATE,
                f"Lanczos, largest residual {residual:.3g} (converged={int(result.value('converged'))})",
                topk=list(top),
            )
        ]

    def _fisher_lanczos(self, result: MetricResult) -> list[Row]:
        return self._lanczos(result, "fisher.lanczos", "true Fisher")

    def _hessian_lanczos(self, result: MetricResult) -> list[Row]:
        return self._lanczos(result, "hessian.lanczos", "Hessian")

    def _fisher_spectrum(self, result: MetricResult) -> list[Row]:
        shared = self.view.n_kv_heads != self.view.n_heads
        blocks = _flat(result.value("attn_trace")) + _flat(result.value("mlp_trace"))
        top = max(_flat(result.value("attn_eigmax")) + _flat(result.value("mlp_eigmax")))
        note = "; no trace: grouped-query heads share key/value entries" if shared else ""
        return [
            Row(
                "fisher.spectrum",
                MATRIX[result.params.get("fisher", "true")],
                "heads and MLPs",
                "per sequence",
                _value(result, "n_examples"),
                None if shared else sum(blocks),
                top,
                LOWER,
                "exact on its examples (Gram trick); top1 the largest block eigenvalue" + note,
            )
        ]

    @classmethod
    def interpret(cls, result: MetricResult) -> list[Interpretation]:
        bad = [r for r in _table(result, "pairs").rows if r[-1] in ("disagree", "inconsistent")]
        return [
            Interpretation(level="warning", text=f"{q}: {a} / {b} = {ratio:.3g} ({verdict})")
            for q, a, b, ratio, verdict in bad
        ]


def _contains(outer: str, inner: str) -> bool:
    """Whether the parameters ``outer`` include those of ``inner``."""
    return outer == inner or outer == ALL


def _pair(quantity: str, a: Row, b: Row, rtol: float) -> list[Any] | None:
    """[quantity, a, b, ratio, verdict] of two rows holding ``quantity``; None when either lacks it."""
    x, y = getattr(a, quantity), getattr(b, quantity)
    if x is None or y is None:
        return None
    ratio = x / y if y != 0 else None
    kind_a = a.top1_kind if quantity == "top1" else ESTIMATE
    kind_b = b.top1_kind if quantity == "top1" else ESTIMATE
    if a.matrix != b.matrix:
        verdict = f"not comparable: {a.matrix} vs {b.matrix}"
    elif a.normalisation != b.normalisation:
        verdict = f"not comparable: {a.normalisation} vs {b.normalisation}"
    elif kind_a == kind_b == ESTIMATE and a.parameters == b.parameters:
        verdict = "agree" if ratio is not None and abs(ratio - 1) <= rtol else "disagree"
    elif {kind_a, kind_b} == {ESTIMATE, LOWER}:
        low, est = (a, b) if kind_a == LOWER else (b, a)
        if not _contains(est.parameters, low.parameters):
            verdict = f"not comparable: {low.parameters} not within {est.parameters}"
        else:
            verdict = "consistent" if getattr(low, quantity) <= getattr(est, quantity) * (1 + rtol) else "inconsistent"
    else:
        verdict = (
            f"not comparable: {a.parameters} vs {b.parameters}"
            if a.parameters != b.parameters
            else "not comparable: two lower bounds"
        )
    return [quantity, a.estimator, b.estimator, ratio, verdict]
