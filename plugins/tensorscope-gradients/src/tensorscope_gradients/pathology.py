"""gradients.pathology: vanishing / exploding blocks relative to the median block, dead units."""

from __future__ import annotations

import math

import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    LayerValue,
    Metric,
    ModelView,
    Params,
    RunShape,
    ScalarValue,
    Step,
    TextValue,
)

from .common import block_squares


class PathologyParams(Params):
    vanishing_ratio: float = Field(1e-2, gt=0, lt=1, description="a block is vanishing when its mean gradient "
                                                                 "norm is below this times the median block's")
    exploding_ratio: float = Field(1e2, gt=1, description="a block is exploding when its mean gradient norm "
                                                          "is above this times the median block's")
    dead_threshold: float = Field(0.0, ge=0, description="a unit is dead when the largest |gradient| of its "
                                                         "outgoing MLP weights is <= this on every batch")


def unit_axis(module: torch.nn.Module) -> int | None:
    """The axis of the MLP output projection's weight that indexes its input (hidden) units:
    1 for nn.Linear ([out, in]), 0 for transformers' Conv1D ([in, out]); None if unknown."""
    if isinstance(module, torch.nn.Linear):
        return 1
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return 0
    return None


def _n_units(module: torch.nn.Module) -> int:
    axis, weight = unit_axis(module), getattr(module, "weight", None)
    return 0 if axis is None or not isinstance(weight, torch.Tensor) else int(weight.shape[axis])


def _mlp_weights(view: ModelView) -> list[tuple[str, int] | None]:
    names = {id(p): n for n, p in view.named_parameters()}
    out: list[tuple[str, int] | None] = []
    for module in view.mlp_out:
        axis = unit_axis(module)
        weight = getattr(module, "weight", None)
        out.append(None if axis is None or weight is None or id(weight) not in names else (names[id(weight)], axis))
    return out


def _layers(indices: list[int]) -> str:
    return ", ".join(str(i) for i in indices)


class GradientPathology(Metric):
    """Per block l, m_l = mean over batches of ||g_l||_2 (the block's part of the gradient
    of each batch's mean token loss), and r_l = m_l / median_l(m_l).

    - ``vanishing``: r_l < ``vanishing_ratio`` (default 0.01);
    - ``exploding``: r_l > ``exploding_ratio`` (default 100);
    - ``dead_units``: per block, the number of MLP hidden units u whose outgoing weights
      (the column of the MLP output projection that reads u) get |gradient| <=
      ``dead_threshold`` (default 0: exactly zero) in every entry on every batch -- that is,
      the unit's activation never carries gradient, e.g. a ReLU/GELU unit that is 0 on every
      token (NaN when the adapter's MLP output module is neither nn.Linear nor Conv1D);
    - ``diagnosis``: a plain-language summary with the suggested fix.
    """

    name = "gradients.pathology"
    supports_dispatch = True  # the shared param_grad, which holds a dispatched model's offloaded weights' too
    version = "1"
    summary = "vanishing/exploding layers relative to the median layer, dead units, diagnosis"
    Params = PathologyParams
    artifacts = ("param_grad",)
    fields = {"relative_norm": "per block: mean gradient norm / the median block's",
              "vanishing": "per block: 1 when relative_norm < vanishing_ratio",
              "exploding": "per block: 1 when relative_norm > exploding_ratio",
              "n_vanishing": "number of vanishing blocks", "n_exploding": "number of exploding blocks",
              "dead_units": "per block: MLP hidden units whose outgoing weights never get gradient",
              "dead_fraction": "per block: dead_units / d_mlp", "n_dead_units": "total dead units",
              "diagnosis": "plain-language diagnosis and suggested fix"}

    def setup(self) -> None:
        self.layer_of = self.view.layer_of_parameter()
        self.mlp = _mlp_weights(self.view)
        self.per_batch = torch.zeros(self.shape.n_batches, self.view.n_layers, dtype=torch.float64)
        params = dict(self.view.named_parameters())
        self.unit_max = [None if m is None else torch.zeros(params[m[0]].shape[m[1]], dtype=torch.float32)
                         for m in self.mlp]
        self.seen = 0

    @classmethod
    def cost(cls, params: PathologyParams, view: ModelView, shape: RunShape) -> Cost:
        units = sum(_n_units(m) for m in view.mlp_out)
        return Cost(state_bytes=8 * shape.n_batches * view.n_layers + 4 * units)

    def update(self, step: Step) -> None:
        grads = step["param_grad"]
        self.per_batch[self.seen] = block_squares(self.view, self.layer_of, grads)[:-1].sqrt()
        for layer, m in enumerate(self.mlp):
            unit_max = self.unit_max[layer]
            if m is None or unit_max is None or m[0] not in grads:
                continue
            name, axis = m
            g = grads[name].detach().abs().float().cpu()
            unit_max.copy_(torch.maximum(unit_max, g.amax(dim=1 - axis)))
        self.seen += 1

    def finalize(self) -> dict[str, object]:
        p = self.params
        mean = self.per_batch[:self.seen].mean(dim=0)
        median = float(mean.quantile(0.5))  # the middle block, or the mean of the two middle ones
        rel = mean / median if median > 0 else torch.full_like(mean, math.nan)
        vanishing = (rel < p.vanishing_ratio).tolist()
        exploding = (rel > p.exploding_ratio).tolist()
        dead = [math.nan if u is None else float((u <= p.dead_threshold).sum()) for u in self.unit_max]
        frac = [math.nan if u is None else d / len(u) for d, u in zip(dead, self.unit_max, strict=True)]
        van = [i for i, v in enumerate(vanishing) if v]
        exp = [i for i, v in enumerate(exploding) if v]
        n_dead = sum(d for d in dead if not math.isnan(d))
        return {"relative_norm": LayerValue(values=rel.tolist(), axis="block"),
                "vanishing": LayerValue(values=[float(v) for v in vanishing], axis="block"),
                "exploding": LayerValue(values=[float(v) for v in exploding], axis="block"),
                "n_vanishing": ScalarValue(value=len(van)), "n_exploding": ScalarValue(value=len(exp)),
                "dead_units": LayerValue(values=dead, axis="block"),
                "dead_fraction": LayerValue(values=frac, axis="block"),
                "n_dead_units": ScalarValue(value=n_dead),
                "diagnosis": TextValue(text=self._diagnosis(van, exp, dead, rel, median))}

    def _diagnosis(self, van: list[int], exp: list[int], dead: list[float], rel: torch.Tensor,
                   median: float) -> str:
        p = self.params
        lines = []
        if not median > 0:
            return "the median block has no gradient at all: check that the loss depends on the parameters"
        if van:
            worst = min(float(rel[i]) for i in van)
            lines.append(f"{len(van)} layer{'s have' if len(van) > 1 else ' has'} vanishing gradients "
                         f"(layer{'s' if len(van) > 1 else ''} {_layers(van)}; below {p.vanishing_ratio:g}x the "
                         f"median layer, smallest {worst:.2g}x): check initialisation and normalisation")
        if exp:
            worst = max(float(rel[i]) for i in exp)
            lines.append(f"{len(exp)} layer{'s have' if len(exp) > 1 else ' has'} exploding gradients "
                         f"(layer{'s' if len(exp) > 1 else ''} {_layers(exp)}; above {p.exploding_ratio:g}x the "
                         f"median layer, largest {worst:.2g}x): lower the learning rate, clip gradients, "
                         f"check normalisation")
        dead_layers = [i for i, d in enumerate(dead) if not math.isnan(d) and d > 0]
        if dead_layers:
            total = int(sum(dead[i] for i in dead_layers))
            lines.append(f"{total} dead MLP unit{'s' if total > 1 else ''} (no gradient on any batch) in "
                         f"layer{'s' if len(dead_layers) > 1 else ''} {_layers(dead_layers)}: check the "
                         f"activation function (dead ReLUs), initialisation and learning rate")
        return "; ".join(lines) if lines else "no gradient pathology found: every layer is within " \
            f"{p.vanishing_ratio:g}x to {p.exploding_ratio:g}x of the median layer and no unit is dead"
