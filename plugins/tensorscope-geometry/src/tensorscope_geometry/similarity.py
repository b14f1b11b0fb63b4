"""geometry.cka / geometry.rsa (layer x layer within a model) and their model-set forms
geometry.cka_across / geometry.rsa_across (layer x layer across models), from the
per-batch matrices of ``geometry.similarity_terms``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    Interpretation,
    LayerValue,
    Metric,
    MetricResult,
    ModelSetMetric,
    ModelView,
    Params,
    RunShape,
    ScalarValue,
    TableValue,
)

from .kernels import (
    cka_ratio,
    hsic_products,
    outlier_scores,
    rdm_ranks,
    recentre,
    spearman_matrix,
    trimmed_keep,
    unbiased_centre,
)
from .similarity_terms import TERMS

OUTLIER_WARNING = 0.1  # |CKA - CKA_trimmed| above which reports warn


@dataclass(frozen=True)
class Terms:
    """One model's per-batch matrices, read from its geometry.similarity_terms result."""

    grams: torch.Tensor  # [B, L, m, m]
    correlations: torch.Tensor
    examples: torch.Tensor  # [B, m]
    sizes: list[int]

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per batch, its (Grams, correlations) [L, n_b, n_b] without the unused padding."""
        for b, n in enumerate(self.sizes):
            yield self.grams[b, :, :n, :n], self.correlations[b, :, :n, :n]


def read_terms(metric: Metric | ModelSetMetric, result: MetricResult, model: str = "") -> Terms:
    if not result.ok:
        raise ValueError(f"{TERMS} of {model or 'the model'} ended {result.status}: {result.reason}")
    return Terms(metric.tensor_of(result, "grams"), metric.tensor_of(result, "correlations"),
                 metric.tensor_of(result, "examples"), [int(n) for n in result.value("sizes")])


def check_aligned(names: list[str], terms: list[Terms]) -> None:
    """The models must hold the same examples of the same batches (same data, seed and tokenizer)."""
    first = terms[0]
    for name, t in zip(names[1:], terms[1:], strict=True):
        if t.sizes != first.sizes or not torch.equal(t.examples, first.examples):
            raise ValueError(f"models {names[0]} and {name} saw different examples in {TERMS} (other data, seed, "
                             "batch size or tokenizer): run them in one analyze() call on the same data; for models "
                             "with different tokenizers use unit='sequence'")


@dataclass
class CKASums:
    """sum_b <K_b, L_b> over batches for every layer pair, and each side's sum_b <K_b, K_b>."""

    cross: torch.Tensor
    self_a: torch.Tensor
    self_b: torch.Tensor
    batches: int = 0

    def cka(self) -> torch.Tensor:
        return cka_ratio(self.cross, self.self_a, self.self_b)


def cka_sums(a: Terms, b: Terms, debiased: bool, trim_fraction: float | None) -> CKASums:
    """Minibatch CKA sums (Nguyen et al. 2021); with ``trim_fraction`` each batch first loses its
    ceil(fraction * n) most outlying examples (``kernels.outlier_scores`` over both sides' layers)."""
    la, lb = a.grams.shape[1], b.grams.shape[1]
    sums = CKASums(torch.zeros(la, lb, dtype=torch.float64), torch.zeros(la, dtype=torch.float64),
                   torch.zeros(lb, dtype=torch.float64))
    for (ga, _), (gb, _) in zip(a.batches(), b.batches(), strict=True):
        if trim_fraction is not None:
            keep = trimmed_keep(torch.maximum(outlier_scores(ga), outlier_scores(gb)), trim_fraction)
            if keep is None:
                continue
            ga, gb = recentre(ga, keep), recentre(gb, keep)
        if debiased:
            if ga.shape[-1] < 4:
                continue
            ga, gb = unbiased_centre(ga), unbiased_centre(gb)
        sums.cross += hsic_products(ga, gb)
        sums.self_a += ga.square().sum((-2, -1))
        sums.self_b += gb.square().sum((-2, -1))
        sums.batches += 1
    return sums


def rsa_mean(a: Terms, b: Terms) -> tuple[np.ndarray, int]:
    """Mean over batches (with >= 3 examples) of the Spearman correlation of the layers' RDM upper triangles."""
    total, batches = None, 0
    for (_, ca), (_, cb) in zip(a.batches(), b.batches(), strict=True):
        if ca.shape[-1] < 3:
            continue
        s = spearman_matrix(rdm_ranks(ca), rdm_ranks(cb))
        total = s if total is None else total + s
        batches += 1
    if total is None:
        raise ValueError("RSA needs a batch with at least 3 examples")
    return total / batches, batches


def adjacent(matrix: torch.Tensor) -> LayerValue:
    """Similarity of resid entry l with entry l + 1 (the change across block l), n_layers entries."""
    return LayerValue(values=[float(matrix[i, i + 1]) for i in range(matrix.shape[0] - 1)], axis="block")


class CKAParams(Params):
    outlier_fraction: float = Field(
        0.02, ge=0.0, lt=0.5,
        description="for the *_trimmed values each batch drops its ceil(outlier_fraction * n) examples whose squared "
                    "distance from the batch mean, relative to the batch's mean, is largest in any layer; 0 drops none")


class CKA(Metric):
    """Linear and debiased CKA between every pair of residual-stream entries (n_layers + 1) of
    one model, as minibatch CKA over the batches of ``geometry.similarity_terms``:
    CKA(l, m) = sum_b <K_bl, K_bm> / sqrt(sum_b <K_bl, K_bl> sum_b <K_bm, K_bm>), with K
    the centred Gram H X X^T H (``linear``, Kornblith et al. 2019) or its unbiased centring
    (``debiased``: the unbiased HSIC U-statistic; batches with fewer than 4 examples are
    left out). This is Nguyen, Raghu & Kornblith's (2021) estimator as their code sums it;
    with one batch it equals full-data CKA. Debiased CKA can be negative.

    Outlier sensitivity (Davari et al. 2023): ``*_trimmed`` recompute both after removing
    from each batch the ceil(outlier_fraction * n) examples with the largest relative squared
    distance from the batch mean (max over layers of ||x_i - mean||^2 / mean_j ||x_j - mean||^2;
    a few high-norm tokens, e.g. a first-position "attention sink", can dominate CKA);
    ``*_outlier_change`` is the largest |CKA - CKA_trimmed| over layer pairs.
    """

    name = "geometry.cka"
    supports_dispatch = True  # reads the shared pass's activations / outputs only
    version = "1"
    summary = "linear and debiased minibatch CKA between layers, with an outlier-trimmed version"
    Params = CKAParams
    requires_metrics = (TERMS,)
    derived_from = (TERMS,)
    fields = {"linear": "[n_layers + 1, n_layers + 1] linear CKA", "debiased": "the same, debiased",
              "linear_trimmed": "linear CKA without each batch's outliers", "debiased_trimmed": "debiased, trimmed",
              "linear_outlier_change": "max |linear - linear_trimmed|",
              "debiased_outlier_change": "max |debiased - debiased_trimmed|",
              "adjacent_linear": "linear CKA of entry l with entry l + 1, n_layers entries",
              "adjacent_debiased": "the same, debiased", "n_batches": "batches in the debiased sums"}

    @classmethod
    def cost(cls, params: CKAParams, view: ModelView, shape: RunShape) -> Cost:
        return Cost(state_bytes=0)

    def finalize(self) -> dict[str, Any]:
        terms = read_terms(self, self.deps[TERMS])
        return cka_fields(terms, terms, self.params.outlier_fraction)

    @classmethod
    def interpret(cls, result: MetricResult) -> list[Interpretation]:
        change = max(result.value("linear_outlier_change") or 0.0, result.value("debiased_outlier_change") or 0.0)
        if change <= OUTLIER_WARNING:
            return []
        return [Interpretation(level="warning", text=(
            f"CKA moves by up to {change:.2f} when each batch's most outlying examples are removed: a few "
            "examples (often high-norm first-position tokens) dominate it; compare the *_trimmed values"))]


def cka_fields(a: Terms, b: Terms, fraction: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("linear", "debiased"):
        full = cka_sums(a, b, kind == "debiased", None)
        trimmed = cka_sums(a, b, kind == "debiased", fraction) if fraction > 0 else full
        if full.batches == 0:
            raise ValueError("no batch had the 4 examples debiased CKA needs")
        out[kind], out[f"{kind}_trimmed"] = full.cka(), trimmed.cka()
        out[f"{kind}_outlier_change"] = ScalarValue(value=float((out[kind] - out[f"{kind}_trimmed"]).abs().max()))
        out[f"adjacent_{kind}"] = adjacent(out[kind])
        out["n_batches"] = ScalarValue(value=full.batches)
    return out


class RSA(Metric):
    """Representational similarity analysis (Kriegeskorte et al. 2008) between every pair of
    residual-stream entries of one model. Per batch of ``geometry.similarity_terms`` and layer,
    the RDM over the batch's examples is RDM_ij = 1 - pearson(x_i, x_j) (over the d_model
    features); two layers are compared by the Spearman correlation of their RDMs' i < j
    entries (ties get average ranks); the value is the mean over batches with at least 3
    examples. NaN where a layer's RDM is constant.
    """

    name = "geometry.rsa"
    supports_dispatch = True  # reads the shared pass's activations / outputs only
    version = "1"
    summary = "RSA: Spearman correlation of layers' correlation-distance RDMs"
    requires_metrics = (TERMS,)
    derived_from = (TERMS,)
    fields = {"rsa": "[n_layers + 1, n_layers + 1] Spearman correlation of the RDMs",
              "adjacent": "RSA of entry l with entry l + 1, n_layers entries", "n_batches": "batches averaged"}

    @classmethod
    def cost(cls, params: Any, view: ModelView, shape: RunShape) -> Cost:
        return Cost(state_bytes=0)

    def finalize(self) -> dict[str, Any]:
        terms = read_terms(self, self.deps[TERMS])
        rsa, batches = rsa_mean(terms, terms)
        matrix = torch.from_numpy(rsa)
        return {"rsa": matrix, "adjacent": adjacent(matrix), "n_batches": ScalarValue(value=batches)}


def _model_terms(metric: ModelSetMetric,
                 results: Mapping[str, Mapping[str, MetricResult]]) -> tuple[list[str], list[Terms]]:
    names = list(results)
    terms = [read_terms(metric, results[name][TERMS], name) for name in names]
    check_aligned(names, terms)
    return names, terms


def _same_layer(names: list[str], terms: list[Terms], pair: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor | None:
    """[n_models, n_models, n_layers + 1] value of layer l against layer l, when all models have the same depth."""
    depths = {t.grams.shape[1] for t in terms}
    if len(depths) != 1:
        return None
    out = torch.empty(len(names), len(names), depths.pop(), dtype=torch.float64)
    for (i, j), m in pair.items():
        out[i, j] = out[j, i] = m.diagonal()
    return out


class _Across(ModelSetMetric):
    """What the two model-set metrics share: their input, and that they need two models."""

    requires_metrics = (TERMS,)
    derived_from = (TERMS,)
    reads_weights = False  # the members' similarity_terms only

    @classmethod
    def cost(cls, params: Any, view: ModelView, shape: RunShape) -> Cost:
        return Cost(state_bytes=0)

    @classmethod
    def set_skip_reason(cls, params: Any, views: Mapping[str, ModelView], base_name: str | None) -> str | None:
        if len(views) >= 2:
            return None
        return f"{cls.name} compares models: pass at least two to analyze() (got {len(views)})"


class CKAAcross(_Across):
    """Linear and debiased minibatch CKA (as ``geometry.cka``) between the residual-stream
    entries of every pair of models of the run (checkpoints of one run, or different models
    on the same data): layer l of model A against layer m of model B, summed over the same
    batches and examples (``geometry.similarity_terms`` of each model; the run checks that
    the examples agree). ``same_layer_*`` holds layer l against layer l for every pair of
    models (1 on the diagonal) when all models have the same depth.
    """

    name = "geometry.cka_across"
    version = "1"
    summary = "CKA between the layers of every pair of models (a model-set metric)"
    Params = CKAParams
    fields = {"pairs": "table model_a, model_b, layer_a, layer_b, linear, debiased, linear_trimmed, debiased_trimmed",
              "same_layer_linear": "[n_models, n_models, n_layers + 1] linear CKA of layer l with layer l",
              "same_layer_debiased": "the same, debiased", "n_models": "models compared"}

    def compute_set(self, views: Mapping[str, ModelView],
                    results: Mapping[str, Mapping[str, MetricResult]]) -> dict[str, Any]:
        names, terms = _model_terms(self, results)
        rows: list[list[Any]] = []
        by_pair: dict[str, dict[tuple[int, int], torch.Tensor]] = {"linear": {}, "debiased": {}}
        for i in range(len(names)):
            for j in range(i, len(names)):
                f = cka_fields(terms[i], terms[j], self.params.outlier_fraction)
                by_pair["linear"][i, j], by_pair["debiased"][i, j] = f["linear"], f["debiased"]
                if i == j:
                    continue
                for la in range(f["linear"].shape[0]):
                    for lb in range(f["linear"].shape[1]):
                        rows.append([names[i], names[j], la, lb] + [float(f[k][la, lb]) for k in (
                            "linear", "debiased", "linear_trimmed", "debiased_trimmed")])
        out: dict[str, Any] = {"pairs": TableValue(columns=["model_a", "model_b", "layer_a", "layer_b", "linear",
                                                            "debiased", "linear_trimmed", "debiased_trimmed"],
                                                   rows=rows),
                               "n_models": ScalarValue(value=len(names))}
        for kind, pair in by_pair.items():
            same = _same_layer(names, terms, pair)
            if same is not None:
                out[f"same_layer_{kind}"] = same
        return out


class RSAAcross(_Across):
    """RSA (as ``geometry.rsa``) between the residual-stream entries of every pair of models of
    the run, on the same batches and examples. ``same_layer`` holds layer l against layer l
    for every pair of models when all models have the same depth."""

    name = "geometry.rsa_across"
    version = "1"
    summary = "RSA between the layers of every pair of models (a model-set metric)"
    fields = {"pairs": "table model_a, model_b, layer_a, layer_b, rsa",
              "same_layer": "[n_models, n_models, n_layers + 1] RSA of layer l with layer l",
              "n_models": "models compared"}

    def compute_set(self, views: Mapping[str, ModelView],
                    results: Mapping[str, Mapping[str, MetricResult]]) -> dict[str, Any]:
        names, terms = _model_terms(self, results)
        rows: list[list[Any]] = []
        pair: dict[tuple[int, int], torch.Tensor] = {}
        for i in range(len(names)):
            for j in range(i, len(names)):
                rsa = torch.from_numpy(rsa_mean(terms[i], terms[j])[0])
                pair[i, j] = rsa
                if i != j:
                    rows += [[names[i], names[j], la, lb, float(rsa[la, lb])]
                             for la in range(rsa.shape[0]) for lb in range(rsa.shape[1])]
        out: dict[str, Any] = {"pairs": TableValue(columns=["model_a", "model_b", "layer_a", "layer_b", "rsa"],
                                                   rows=rows),
                               "n_models": ScalarValue(value=len(names))}
        same = _same_layer(names, terms, pair)
        if same is not None:
            out["same_layer"] = same
        return out
