"""geometry.effective_rank: how many directions activations and weight matrices really use."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from tensorscope_core.plugin_api import Cost, LayerValue, Metric, ModelView, Params, RunShape, Step, TableValue

from .spectra import CovarianceAccumulator, covariance_singular_values, effective_rank, participation_ratio

Source = Literal["resid", "mlp_hidden"]


class EffectiveRankParams(Params):
    sources: tuple[Source, ...] = Field(
        ("resid",), min_length=1,
        description="activations to summarise: 'resid' (n_layers + 1 entries) and/or 'mlp_hidden' (n_layers); "
                    "each layer holds a d x d float64 scatter, so 'mlp_hidden' costs n_layers * d_mlp^2 * 8 bytes")
    weights: bool = Field(True, description="also the effective rank of every 2-D weight matrix of every block, "
                                            "the token embedding and an untied unembedding")


class EffectiveRank(Metric):
    """Effective dimensionality of activations per layer and of weight matrices.

    Activations: over the real (unpadded) tokens of every batch, the per-layer covariance
    is accumulated in float64 as a running mean and centred scatter S = X_c^T X_c (Chan et
    al.'s pairwise merge; activations are centred by their mean over all tokens). Its
    eigenvalues l_k are the squared singular values s_k of the centred data matrix X_c.
    Reported: the Roy & Vetterli (2007) effective rank erank = exp(-sum p_k ln p_k) with
    p_k = s_k / sum s, and the participation ratio PR = (sum l)^2 / sum l^2 of the
    covariance eigenvalues. 1 <= erank <= rank; both are invariant to scaling.

    Weights (``weights=True``): the same two numbers from the singular values s_k of each
    2-D parameter of each block (as stored: GPT-2's fused c_attn is one d x 3d matrix),
    of the token embedding and of the unembedding when it is not tied to the embedding;
    PR uses l_k = s_k^2.
    """

    name = "geometry.effective_rank"
    supports_dispatch = True  # the shared capture, and the weights through view.named_weights
    version = "1"
    summary = "Roy-Vetterli effective rank and participation ratio of activations per layer and of weights"
    Params = EffectiveRankParams
    artifacts = ("resid", "mlp_hidden")
    fields = {"resid_erank": "effective rank of the centred residual stream, n_layers + 1 entries",
              "resid_participation_ratio": "participation ratio of its covariance eigenvalues",
              "mlp_hidden_erank": "effective rank of the centred MLP hidden units, n_layers entries",
              "mlp_hidden_participation_ratio": "participation ratio of their covariance eigenvalues",
              "weights": "table layer, parameter, rows, cols, erank, erank_fraction (erank / min(rows, cols)), "
                         "participation_ratio; layer is null outside the blocks",
              "weights_erank_fraction": "per block, the mean erank_fraction of its matrices"}

    @classmethod
    def cost(cls, params: EffectiveRankParams, view: ModelView, shape: RunShape) -> Cost:
        dims = _source_dims(params.sources, view)
        tokens = shape.n_sequences * shape.seq_len
        flops = sum(2.0 * tokens * d * d + 10.0 * d ** 3 for d in dims)
        # weights: each matrix's float64 copy and the copy LAPACK's SVD overwrites (the embedding's, 453 MiB
        # on the 135M shape)
        largest = max((p.numel() for p in view.model.parameters() if p.ndim == 2), default=0)
        return Cost(state_bytes=sum(CovarianceAccumulator.declared_bytes(d) for d in dims), flops=flops,
                    transient_bytes=2 * 8 * largest if params.weights else 0)

    def setup(self) -> None:
        self.accumulators = {
            source: [CovarianceAccumulator(d) for d in _source_dims((source,), self.view)]
            for source in self.params.sources}

    def update(self, step: Step) -> None:
        real = step.batch.attention_mask.bool()
        for source, accumulators in self.accumulators.items():
            for acc, acts in zip(accumulators, step[source], strict=True):
                acc.add(acts[real.to(acts.device)])

    def finalize(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for source, accumulators in self.accumulators.items():
            eranks, ratios = [], []
            for acc in accumulators:
                s, lam = covariance_singular_values(acc.scatter)
                eranks.append(effective_rank(s) if acc.count >= 2 else float("nan"))
                ratios.append(participation_ratio(lam) if acc.count >= 2 else float("nan"))
            axis = "resid" if source == "resid" else "block"  # resid: n_layers + 1 entries; mlp_hidden: n_layers
            out[f"{source}_erank"] = LayerValue(values=eranks, axis=axis)
            out[f"{source}_participation_ratio"] = LayerValue(values=ratios, axis=axis)
        if self.params.weights:
            out.update(_weight_ranks(self.view))
        return out


def _source_dims(sources: tuple[str, ...], view: ModelView) -> list[int]:
    dims: list[int] = []
    for source in sources:
        dims += [view.d_model] * (view.n_layers + 1) if source == "resid" else [view.d_mlp] * view.n_layers
    return dims


def _weight_ranks(view: ModelView) -> dict[str, Any]:
    layer_of = view.layer_of_parameter()
    matrices = {name for name, p in view.named_parameters() if p.ndim == 2 and (
        layer_of.get(name) is not None or p is view.embed.weight
        or (view.unembed is not None and p is getattr(view.unembed, "weight", None)))}
    rows: list[list[Any]] = []
    per_layer: list[list[float]] = [[] for _ in range(view.n_layers)]
    for name, p in view.named_weights():  # one at a time: a dispatched model's offloaded ones load in turn
        if name not in matrices:
            continue
        s = torch.linalg.svdvals(p.double().cpu())
        erank = effective_rank(s)
        fraction = erank / min(p.shape)
        layer = layer_of.get(name)
        rows.append([layer, name, int(p.shape[0]), int(p.shape[1]), erank, fraction, participation_ratio(s.square())])
        if layer is not None:
            per_layer[layer].append(fraction)
    columns = ["layer", "parameter", "rows", "cols", "erank", "erank_fraction", "participation_ratio"]
    return {"weights": TableValue(columns=columns, rows=rows),
            "weights_erank_fraction": LayerValue(values=[sum(f) / len(f) if f else float("nan") for f in per_layer],
                                                  axis="block")}
