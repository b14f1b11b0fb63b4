"""superposition.sparsity: how sparse MLP hidden units are, and how many input tokens drive each."""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    Interpretation,
    LayerValue,
    Metric,
    MetricResult,
    ModelView,
    Params,
    RunShape,
    Step,
)

DEAD_WARNING = 0.1  # fraction of a layer's units never active above which reports warn


class SparsityParams(Params):
    threshold: float = Field(0.01, ge=0, description="a unit is inactive on a token when |activation| <= threshold")
    top_k: int = Field(32, ge=1, description="strongest activations per unit kept for the polysemanticity proxy")


def merge_top_k(values: torch.Tensor, ids: torch.Tensor, new_values: torch.Tensor, new_ids: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per unit, the k largest of the kept (values [U, k], ids [U, k]) and a batch's activations
    new_values [U, N] on tokens new_ids [N]; earlier entries win ties."""
    all_values = torch.cat([values, new_values], dim=1)
    all_ids = torch.cat([ids, new_ids.expand(new_values.shape[0], -1)], dim=1)
    order = torch.sort(all_values, dim=1, descending=True, stable=True).indices[:, :k]
    return all_values.gather(1, order), all_ids.gather(1, order)


def token_perplexity(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per unit [U]: exp(entropy) of the distribution of its positive top activations over token ids,
    p_t = sum of a+ on token t / sum of a+; 1 for a unit driven by one token type, NaN without positive activations."""
    weights = values.double().clamp_min(0).nan_to_num(0.0, posinf=0.0, neginf=0.0)
    ids_sorted, order = ids.sort(dim=1, stable=True)
    group = torch.zeros_like(ids_sorted)
    group[:, 1:] = (ids_sorted[:, 1:] != ids_sorted[:, :-1]).long().cumsum(1)  # one slot per distinct id
    mass = torch.zeros_like(weights).scatter_add_(1, group, weights.gather(1, order))
    total = mass.sum(1, keepdim=True)
    p = mass / total.clamp_min(1e-300)
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(1)
    return torch.where(total.squeeze(1) > 0, entropy.exp(), torch.full_like(entropy, math.nan))


class SuperpositionSparsity(Metric):
    """Activation sparsity of the MLP hidden units (the core's ``mlp_hidden``: the input of the
    MLP output projection, after the nonlinearity) over real (unpadded) tokens:

    - ``zero_fraction[l, i]``: fraction of tokens on which unit i of layer l is inactive,
      |a| <= ``threshold``; per layer its mean, and ``dead_fraction`` (units never active);
    - ``l0``: mean over tokens of the number of active units (``l0_fraction`` = l0 / d_mlp), with
      its standard deviation over tokens.

    Polysemanticity proxy (``polysemanticity[l, i]``): the unit's ``top_k`` largest activations
    over the run, with the input token at each; p_t is the share of their positive activation
    mass on token id t, and the proxy is exp(-sum p_t ln p_t), the effective number of distinct
    input tokens driving the unit's strongest responses: 1 for a unit that responds to one
    token type, up to top_k. It sees token identity only (a unit with two meanings of one token
    scores 1). For masked-LM encoders, masked positions count as the mask token.
    """

    name = "superposition.sparsity"
    supports_dispatch = True  # reads the shared pass's activations / outputs only
    version = "1"
    summary = "MLP unit activation sparsity, L0 per token, and a token-polysemanticity proxy"
    Params = SparsityParams
    artifacts = ("mlp_hidden",)
    fields = {"zero_fraction": "[n_layers, d_mlp] fraction of tokens with |a| <= threshold",
              "layer_zero_fraction": "per layer, mean zero_fraction", "dead_fraction": "units never active",
              "l0": "mean active units per token", "l0_fraction": "l0 / d_mlp", "l0_std": "std of it over tokens",
              "polysemanticity": "[n_layers, d_mlp] effective number of tokens among the top_k activations",
              "layer_polysemanticity": "per layer, mean over units with a positive activation",
              "n_tokens": "tokens counted"}

    @classmethod
    def cost(cls, params: SparsityParams, view: ModelView, shape: RunShape) -> Cost:
        units = view.n_layers * view.d_mlp
        tokens = shape.n_sequences * shape.seq_len
        return Cost(state_bytes=8 * (units + 2 * units * params.top_k + 2 * view.n_layers + 1),
                    flops=float(tokens) * units * (4 + math.log2(params.top_k + 1)))

    def setup(self) -> None:
        layers, units, k = self.view.n_layers, self.view.d_mlp, self.params.top_k
        self.inactive = torch.zeros(layers, units, dtype=torch.float64)
        self.top_values = torch.full((layers, units, k), -math.inf, dtype=torch.float64)
        self.top_ids = torch.full((layers, units, k), -1, dtype=torch.long)
        self.l0_sum = torch.zeros(layers, dtype=torch.float64)
        self.l0_squares = torch.zeros(layers, dtype=torch.float64)
        self.tokens = torch.zeros((), dtype=torch.float64)

    def update(self, step: Step) -> None:
        real = step.batch.attention_mask.bool()
        ids = step.batch.input_ids
        if not self.view.causal and self.view.mask_token_id is not None:
            ids = ids.masked_fill(step.target_mask.bool(), self.view.mask_token_id)  # what the encoder saw
        token_ids = ids[real]
        for layer, acts in enumerate(step["mlp_hidden"]):
            a = acts[real.to(acts.device)].detach().double().cpu()  # [N, d_mlp]
            active = a.abs() > self.params.threshold
            self.inactive[layer] += (~active).sum(0)
            l0 = active.sum(1).double()
            self.l0_sum[layer] += l0.sum()
            self.l0_squares[layer] += l0.square().sum()
            self.top_values[layer], self.top_ids[layer] = merge_top_k(
                self.top_values[layer], self.top_ids[layer], a.T, token_ids, self.params.top_k)
        self.tokens += int(real.sum())

    def finalize(self) -> dict[str, Any]:
        n = float(self.tokens)
        if n == 0:
            raise ValueError("no real tokens: sparsity needs data")
        zero = self.inactive / n
        l0 = self.l0_sum / n
        l0_std = (self.l0_squares / n - l0.square()).clamp_min(0).sqrt()
        poly = torch.stack([token_perplexity(v, i) for v, i in zip(self.top_values, self.top_ids, strict=True)])
        def per_block(values: torch.Tensor) -> LayerValue:  # one entry per block's MLP
            return LayerValue(values=values.tolist(), axis="block")

        return {"zero_fraction": zero, "layer_zero_fraction": per_block(zero.mean(1)),
                "dead_fraction": per_block((zero == 1).double().mean(1)),
                "l0": per_block(l0), "l0_fraction": per_block(l0 / zero.shape[1]),
                "l0_std": per_block(l0_std),
                "polysemanticity": poly, "layer_polysemanticity": per_block(poly.nanmean(1)),
                "n_tokens": n}

    @classmethod
    def interpret(cls, result: MetricResult) -> list[Interpretation]:
        return [Interpretation(level="warning", where=f"layer {layer}",
                               text=f"{dead:.0%} of the MLP units are never active (|a| <= threshold on every token)")
                for layer, dead in enumerate(result.value("dead_fraction")) if dead is not None and dead > DEAD_WARNING]
