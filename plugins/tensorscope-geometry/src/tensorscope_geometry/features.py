"""superposition.features: how feature directions of a weight matrix share its dimensions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from tensorscope_core.plugin_api import (
    Cost,
    LayerValue,
    Metric,
    ModelView,
    Params,
    PreparedData,
    RunShape,
    TableValue,
    linear_out_in,
)

from .frames import FrameStats, frame_stats, frame_working_bytes, regime

Source = Literal["mlp_out", "embed", "unembed", "parameter", "sae"]


class FeaturesParams(Params):
    source: Source = Field(
        "mlp_out", description="'mlp_out': each block's MLP output weights (one direction in the residual stream "
                               "per hidden unit); 'embed' / 'unembed': one row per token; 'parameter': the model "
                               "parameter named by `parameter`; 'sae': tensor `tensor` of the safetensors file `path`")
    parameter: str | None = Field(
        None, description="source 'parameter': a name from model.named_parameters(); '{layer}' in it is replaced "
                          "by every block index, e.g. 'transformer.h.{layer}.mlp.c_fc.weight'")
    path: str | None = Field(None, description="source 'sae': a .safetensors file (e.g. a sparse-autoencoder decoder)")
    tensor: str | None = Field(None, description="source 'sae': the name of the 2-D tensor in `path`")
    features_along: Literal["rows", "columns"] = Field(
        "rows", description="sources 'parameter' and 'sae': whether the features are the matrix's rows "
                            "(an SAE decoder [n_features, d_model]) or its columns")
    orthogonal_cos: float = Field(0.1, gt=0, lt=1, description="regime 'none' needs max |cos| <= this (n <= d)")
    welch_slack: float = Field(1.05, ge=1, description="regime 'superposition_optimal' needs max |cos| <= "
                                                       "welch_slack * Welch bound (n > d)")

    @model_validator(mode="after")
    def _source_fields(self) -> FeaturesParams:
        if self.source == "parameter" and not self.parameter:
            raise ValueError("source 'parameter' needs parameter='<name from model.named_parameters()>'")
        if self.source == "sae":
            if not self.path or not self.tensor:
                raise ValueError("source 'sae' needs path='<file>.safetensors' and tensor='<name>'")
            _check_safetensor(Path(self.path), self.tensor)
        return self


def _check_safetensor(path: Path, name: str) -> None:
    from safetensors import safe_open

    if not path.is_file():
        raise ValueError(f"no such safetensors file: {path}")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        if name not in keys:
            raise ValueError(f"{path} has no tensor '{name}'; it holds {sorted(keys)[:20]}")
        shape = f.get_slice(name).get_shape()
    if len(shape) != 2:
        raise ValueError(f"tensor '{name}' in {path} has shape {shape}: a matrix [n_features, d] is needed")


class SuperpositionFeatures(Metric):
    """Superposition of the feature directions of a weight matrix (Elhage et al. 2022, "Toy
    Models of Superposition", and frame bounds), per matrix: n non-zero feature directions
    f_i in R^d (zero directions are left out and counted).

    - ``d_over_n`` = d / n; ``dimensions_per_feature`` D* = d / ||F||_F^2 (Elhage's, equal to
      d / n for unit-norm features);
    - ``feature_dimensionality`` D_i = ||f_i||^2 / sum_j (f^_i . f_j)^2 (j = i included),
      ``interference`` sum_{j != i} (f^_i . f_j)^2 per feature, with their means;
      ``gram_offdiag_rms`` the RMS of the off-diagonal Gram entries f_i . f_j;
    - over the unit directions u_i: ``mean_abs_cos``, ``max_abs_cos`` over pairs i != j against
      the Welch (1974) bound sqrt((n - d) / (d (n - 1))) (0 for n <= d); ``frame_potential``
      sum_{i,j} (u_i . u_j)^2 against its minimum n^2 / d for n >= d (tight frames) or n;
    - ``regimes``: 'none' (n <= d, max |cos| <= orthogonal_cos), 'correlated' (n <= d, above it),
      'superposition_optimal' (n > d, max |cos| <= welch_slack * Welch), 'superposition' (n > d).

    Sources: 'mlp_out' gives, per block, the direction each MLP hidden unit writes into the
    residual stream (the column of the output projection's [d_model, d_mlp] weight);
    'embed' / 'unembed' one row per token; 'parameter' / 'sae' a matrix the user names.
    All in float64; pairwise cosines are computed in chunks of rows (no n x n matrix is held).
    """

    name = "superposition.features"
    version = "1"
    summary = "feature dimensionality, interference, |cos| vs the Welch bound, frame potential, regime"
    Params = FeaturesParams
    artifacts = ("weights",)
    supports_dispatch = True  # reads one matrix at a time through weight_of / read_parameter (loaded copies)
    fields = {"d_over_n": "d / n per matrix", "dimensions_per_feature": "Elhage D* = d / ||F||_F^2",
              "mean_feature_dimensionality": "mean D_i", "mean_interference": "mean sum_{j!=i} (f^_i . f_j)^2",
              "max_interference": "max over features of the same", "gram_offdiag_rms": "RMS of f_i . f_j, i != j",
              "mean_abs_cos": "mean |cos| over pairs", "max_abs_cos": "max |cos| over pairs",
              "welch_bound": "Welch lower bound on max |cos|", "max_cos_over_welch": "max |cos| / Welch (NaN n<=d)",
              "frame_potential": "sum_{i,j} (u_i . u_j)^2", "frame_potential_min": "n^2/d (n>=d) or n",
              "frame_potential_ratio": "frame_potential / frame_potential_min (1: tight frame)",
              "n_features": "non-zero features", "n_zero": "zero features left out",
              "regimes": "table matrix, layer, n, d, regime",
              "feature_dimensionality": "[n_matrices, n] D_i (NaN for zero features)",
              "interference": "[n_matrices, n] per-feature interference"}

    @classmethod
    def skip_reason(cls, params: FeaturesParams, view: ModelView, data: PreparedData | None) -> str | None:
        if params.source == "unembed" and getattr(view.unembed, "weight", None) is None:
            return f"{view.name} has no unembedding matrix: use source='embed'"
        if params.source == "mlp_out" and not view.mlp_out:
            return f"the {view.family} adapter maps no MLP output modules: use source='parameter'"
        return None

    @classmethod
    def cost(cls, params: FeaturesParams, view: ModelView, shape: RunShape) -> Cost:
        shapes = _shapes(view, params)
        flops = sum(2.0 * n * n * d + 4.0 * n * d * d for n, d in shapes)
        features = sum(n for n, _ in shapes)
        # the stacked [n_matrices, n] float64 D_i and interference, when every matrix has the same n
        results = 16 * features if len({n for n, _ in shapes}) == 1 else 0
        # finalize reads one matrix at a time (frame_working_bytes), beside every matrix's two [n] float64
        # statistics, their stacked copy, for source 'sae' the tensor loaded from the file and, on a dispatched
        # model, the matrix's loaded copy
        working = (max((frame_working_bytes(n, d) for n, d in shapes), default=0) + 16 * features + results
                   + _loaded_bytes(params) + _copied_bytes(view, params))
        return Cost(state_bytes=0, finalize_bytes=working, result_bytes=results, flops=flops)

    def finalize(self) -> dict[str, Any]:
        matrices = feature_matrices(self.view, self.params)
        stats = [(label, layer, frame_stats(f)) for label, layer, f in matrices]
        return features_fields(stats, self.params)


def _shapes(view: ModelView, p: FeaturesParams) -> list[tuple[int, int]]:
    """(n features, d) of each matrix of the source, without reading any values."""
    if p.source == "mlp_out":
        return [(view.d_mlp, view.d_model)] * view.n_layers
    if p.source in ("embed", "unembed"):
        return [(view.vocab_size, view.d_model)]
    if p.source == "sae":
        from safetensors import safe_open

        with safe_open(str(p.path), framework="pt") as f:
            rows, cols = f.get_slice(str(p.tensor)).get_shape()
        return [(rows, cols) if p.features_along == "rows" else (cols, rows)]
    params = dict(view.model.named_parameters())
    shapes = [tuple(params[n].shape) for n, _ in _parameter_names(view, p) if n in params and params[n].ndim == 2]
    return [(a, b) if p.features_along == "rows" else (b, a) for a, b in shapes]


def _loaded_bytes(p: FeaturesParams) -> int:
    """Bytes of the tensor source 'sae' reads into memory (the other sources are views of the model's weights)."""
    if p.source != "sae":
        return 0
    from safetensors import safe_open

    with safe_open(str(p.path), framework="pt") as f:
        tensor = f.get_slice(str(p.tensor))
        rows, cols = tensor.get_shape()
        return rows * cols * _SAFETENSORS_ITEM_BYTES.get(tensor.get_dtype(), 8)


def _copied_bytes(view: ModelView, p: FeaturesParams) -> int:
    """The largest matrix a dispatched model loads for the read (an offloaded one, read one at a time;
    ``weight_of`` / ``read_parameter`` read a held one in place, as a plain model's)."""
    if view.device_map is None or p.source == "sae":
        return 0
    if p.source == "mlp_out":
        return max((view.loaded_bytes(m) for m in view.mlp_out), default=0)
    if p.source in ("embed", "unembed"):
        module = view.embed if p.source == "embed" else view.unembed
        return view.loaded_bytes(module) if module is not None else 0
    params = dict(view.model.named_parameters())
    owners = [name.rpartition(".") for name, _ in _parameter_names(view, p) if name in params]
    return max((view.loaded_bytes(view.model.get_submodule(owner), attr) for owner, _, attr in owners), default=0)


_SAFETENSORS_ITEM_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}


def _parameter_names(view: ModelView, p: FeaturesParams) -> list[tuple[str, int | None]]:
    """Source 'parameter': (name, layer) with '{layer}' expanded over the blocks."""
    pattern = str(p.parameter)
    if "{layer}" in pattern:
        return [(pattern.format(layer=layer), layer) for layer in range(view.n_layers)]
    return [(pattern, None)]


def feature_matrices(view: ModelView, p: FeaturesParams) -> Iterator[tuple[str, int | None, torch.Tensor]]:
    """(label, layer, features [n, d] as rows) for the chosen source, one matrix at a time: views of a plain
    model's weights, loaded copies of a dispatched model's (``weight_of``, ``read_parameter``)."""
    if p.source == "mlp_out":
        for index, module in enumerate(view.mlp_out):
            yield f"mlp_out {index}", index, linear_out_in(module, view.weight_of(module)).T
    elif p.source == "embed":
        yield "embed", None, view.weight_of(view.embed)
    elif p.source == "unembed":
        assert view.unembed is not None  # skip_reason checked it
        yield "unembed", None, view.weight_of(view.unembed)
    elif p.source == "sae":
        from safetensors import safe_open

        with safe_open(str(p.path), framework="pt") as f:
            m = f.get_tensor(str(p.tensor))
        yield f"{Path(str(p.path)).name}:{p.tensor}", None, m if p.features_along == "rows" else m.T
    else:
        params = dict(view.model.named_parameters())
        for name, layer in _parameter_names(view, p):
            if name not in params:
                matrices = [k for k, v in params.items() if v.ndim == 2][:6]
                raise ValueError(f"{view.name} has no parameter '{name}'; its matrices include {matrices}")
            if params[name].ndim != 2:
                raise ValueError(f"parameter '{name}' has shape {tuple(params[name].shape)}: a matrix is needed")
            w = view.read_parameter(name)
            yield name, layer, w if p.features_along == "rows" else w.T


def features_fields(stats: list[tuple[str, int | None, FrameStats]], p: FeaturesParams) -> dict[str, Any]:
    labels = [label for label, _, _ in stats]

    def per_matrix(values: list[float]) -> LayerValue:
        return LayerValue(values=values, labels=labels, axis="labelled")

    s = [st for _, _, st in stats]
    out: dict[str, Any] = {
        "d_over_n": per_matrix([x.d / x.n for x in s]),
        "dimensions_per_feature": per_matrix([x.dimensions_per_feature for x in s]),
        "mean_feature_dimensionality": per_matrix([float(x.feature_dimensionality.nanmean()) for x in s]),
        "mean_interference": per_matrix([float(x.interference.nanmean()) for x in s]),
        "max_interference": per_matrix([float(x.interference.nan_to_num(-1.0).max()) for x in s]),
        "gram_offdiag_rms": per_matrix([x.gram_offdiag_rms for x in s]),
        "mean_abs_cos": per_matrix([x.mean_abs_cos for x in s]),
        "max_abs_cos": per_matrix([x.max_abs_cos for x in s]),
        "welch_bound": per_matrix([x.welch_bound for x in s]),
        "max_cos_over_welch": per_matrix([x.max_abs_cos / x.welch_bound if x.welch_bound > 0 else float("nan")
                                          for x in s]),
        "frame_potential": per_matrix([x.frame_potential for x in s]),
        "frame_potential_min": per_matrix([x.frame_potential_min for x in s]),
        "frame_potential_ratio": per_matrix([x.frame_potential / x.frame_potential_min for x in s]),
        "n_features": per_matrix([float(x.n) for x in s]),
        "n_zero": per_matrix([float(x.n_zero) for x in s]),
        "regimes": TableValue(columns=["matrix", "layer", "n", "d", "regime"], rows=[
            [label, layer, x.n, x.d, regime(x.n, x.d, x.max_abs_cos, p.orthogonal_cos, p.welch_slack)]
            for label, layer, x in stats]),
    }
    if len({x.feature_dimensionality.numel() for x in s}) == 1:
        out["feature_dimensionality"] = torch.stack([x.feature_dimensionality for x in s])
        out["interference"] = torch.stack([x.interference for x in s])
    return out
