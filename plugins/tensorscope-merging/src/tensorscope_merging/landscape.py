"""landscape.surface_2d: the filter-normalised 2-D loss surface of Li et al. (NeurIPS 2018).

f(alpha, beta) = L(theta + alpha * delta + beta * eta) for two Gaussian directions delta, eta
shaped like the parameters. Filter normalisation rescales every output row of every
weight matrix of a direction to the norm of the same row of theta, so the plot's scale is
comparable across layers and models; 'layer' rescales each matrix as a whole (the reference's
``norm='layer'``), 'global' the matrices together. 1-D tensors (biases, norm gains) are zeroed
(the reference's ``ignore='biasbn'``) or set equal to theta, whatever the normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from tensorscope_core.plugin_api import (
    Cost,
    Metric,
    ModelView,
    Params,
    Rung,
    RunShape,
    ScalarValue,
    SeriesValue,
    Step,
    batch_loss,
    float64_dot,
    float64_sum_of_squares,
    offloaded_bytes,
    trainable_model,
)

from .passes import loss_batches

Tensors = dict[str, torch.Tensor]

#: the rung keeping the two directions in bfloat16
BF16_DIRECTIONS = "bf16_directions"


class SurfaceParams(Params):
    grid: int = Field(11, ge=3, le=201, description="grid points per axis; odd, so theta itself is the centre point")
    span: float = Field(1.0, gt=0, description="the grid covers alpha, beta in [-span, span]")
    max_batches: int | None = Field(4, ge=1, description="average the surface over the run's first this many "
                                                         "batches; None: all of them")
    direction_seed: int = Field(123, description="seed of the Gaussian directions (the reference uses 123)")
    normalization: Literal["filter", "layer", "global", "none"] = Field(
        "filter", description="'filter': each output row of a direction gets the norm of theta's row; 'layer': each "
                              "matrix the norm of theta's matrix; 'global': all matrices together the norm of "
                              "theta's matrices; 'none'")
    one_dim: Literal["zero", "weights"] = Field(
        "zero", description="directions of 1-D tensors (biases, norm gains): 'zero' (the reference's "
                            "ignore='biasbn') or 'weights' (equal to theta, as the reference without ignore)")
    direction_dtype: Literal["parameters", "bfloat16"] = Field(
        "parameters", description="dtype the two directions are kept in: the parameters' or bfloat16 (half "
                                  "the memory of float32; the directions rounded to 8 significant bits)")

    @field_validator("grid")
    @classmethod
    def _odd(cls, grid: int) -> int:
        if grid % 2 == 0:
            raise ValueError(f"grid must be odd so that the model itself is the centre point; use {grid + 1}")
        return grid


def output_row_dims(model: nn.Module) -> dict[str, int]:
    """Per weight matrix, the dimension that indexes its output rows: 1 for HF's Conv1D
    (stored [in, out]), 0 for everything else (nn.Linear [out, in], embeddings [tokens, d])."""
    dims: dict[str, int] = {}
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            dims[full] = 1 if type(module).__name__ == "Conv1D" and name == "weight" else 0
    return dims


def gaussian_direction(theta: Mapping[str, torch.Tensor], gen: torch.Generator) -> Tensors:
    """Standard normal entries shaped like each parameter, drawn in ``theta``'s order (on the CPU
    generator, whatever the parameters' device, so a seed draws the same direction everywhere)."""
    return {n: torch.randn(t.shape, generator=gen, dtype=torch.float64).to(device=t.device, dtype=t.dtype)
            for n, t in theta.items()}


def normalize_direction(direction: Mapping[str, torch.Tensor], theta: Mapping[str, torch.Tensor],
                        row_dims: Mapping[str, int], normalization: str, one_dim: str) -> Tensors:
    """Scale the tensors of two or more dimensions of ``direction`` to theta's norms, each scale
    ``||theta_part|| / (||d_part|| + 1e-10)``: per output row of each tensor (``'filter'``), per
    tensor (``'layer'``), or one scale for all of them (``'global'``; norms over all those
    tensors, in float64); ``'none'`` keeps them. 1-D tensors are zeroed or set equal to theta."""
    out: Tensors = {}
    matrices = [name for name in direction if theta[name].dim() > 1]
    for name in direction:
        if theta[name].dim() <= 1:
            out[name] = torch.zeros_like(theta[name]) if one_dim == "zero" else theta[name].detach().clone()
    if normalization == "none":
        out.update({name: direction[name].clone() for name in matrices})
    elif normalization == "filter":
        out.update({name: _filter_normalized(direction[name], theta[name].detach(), row_dims.get(name, 0))
                    for name in matrices})
    elif normalization == "layer":
        out.update({name: direction[name] * _scale([theta[name]], [direction[name]]) for name in matrices})
    else:
        scale = _scale([theta[n] for n in matrices], [direction[n] for n in matrices])
        out.update({name: direction[name] * scale for name in matrices})
    return {name: out[name] for name in direction}


def _filter_normalized(d: torch.Tensor, t: torch.Tensor, row: int) -> torch.Tensor:
    """``d`` with every output row (slice along ``row``) scaled to the norm of the same row of ``t``."""
    rows_d = d.movedim(row, 0).reshape(d.shape[row], -1)
    rows_t = t.movedim(row, 0).reshape(t.shape[row], -1)
    scale = rows_t.norm(dim=1) / (rows_d.norm(dim=1) + 1e-10)
    return (rows_d * scale[:, None]).reshape(d.movedim(row, 0).shape).movedim(0, row).contiguous()


def _scale(theta: Sequence[torch.Tensor], direction: Sequence[torch.Tensor]) -> float:
    """``||theta|| / (||direction|| + 1e-10)`` over all the tensors given, in float64."""
    def norm(tensors: Sequence[torch.Tensor]) -> float:
        return math.sqrt(sum(float(float64_sum_of_squares(t)) for t in tensors))

    return norm(theta) / (norm(direction) + 1e-10)


def direction_cosine(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Cosine between two directions as flat vectors (near 0: the plot's axes are orthogonal)."""
    dot = sum(float(float64_dot(a[n], b[n])) for n in a)
    na = math.sqrt(sum(float(float64_sum_of_squares(a[n])) for n in a))
    nb = math.sqrt(sum(float(float64_sum_of_squares(b[n])) for n in b))
    return dot / (na * nb) if na > 0 and nb > 0 else math.nan


def surface(loss_at: Callable[[Tensors], torch.Tensor], theta: Mapping[str, torch.Tensor],
            delta: Mapping[str, torch.Tensor], eta: Mapping[str, torch.Tensor], coords: torch.Tensor,
            point: Tensors | None = None) -> torch.Tensor:
    """``f[i, j] = loss_at(theta + coords[i] * delta + coords[j] * eta)``, float64 [grid, grid].

    Every grid point is written into ``point`` (tensors like theta's; made here when not given), so
    one perturbed copy of the weights is held whatever the grid; ``alpha * delta + theta`` is formed
    in place there (the same roundings as ``theta + alpha * delta``), ``beta * eta`` in one temporary
    the size of one parameter (two when the directions are kept in another dtype: the cast too)."""
    point = {n: torch.empty_like(t) for n, t in theta.items()} if point is None else point
    out = torch.empty(len(coords), len(coords), dtype=torch.float64)
    with torch.no_grad():
        for i, alpha in enumerate(coords.tolist()):
            for j, beta in enumerate(coords.tolist()):
                for n, t in theta.items():
                    point[n].copy_(delta[n]).mul_(alpha).add_(t).add_(beta * eta[n].to(t.dtype))
                out[i, j] = float(loss_at(point))
    return out


def roughness(values: torch.Tensor) -> float:
    """Total variation: the mean absolute difference between neighbouring grid points (both axes)."""
    steps = torch.cat([(values[1:] - values[:-1]).abs().flatten(), (values[:, 1:] - values[:, :-1]).abs().flatten()])
    return float(steps.mean())


class LossSurface2D(Metric):
    """The 2-D loss surface of Li et al. (2018) around the model's weights theta.

    Two directions delta, eta are drawn from N(0, 1) per parameter entry (seed
    ``direction_seed``; all trainable parameters, tied ones once), filter-normalised (each
    output row of each weight matrix scaled to the norm of theta's row: rows of nn.Linear and
    embeddings, columns of GPT-2's Conv1D; ``normalization='layer'``: each weight matrix scaled
    to the norm of theta's matrix; ``'global'``: all weight matrices together scaled to the norm
    of theta's matrices) with 1-D tensors zeroed or set to theta. On a
    ``grid`` x ``grid`` lattice of alpha, beta in [-span, span], ``surface[i, j]`` is the
    run's token loss of theta + alpha_i delta + beta_j eta, averaged over the first
    ``max_batches`` batches (token-weighted, as ``basic.loss``), so ``center_loss`` = f(0, 0)
    is the model's own loss on those batches. ``roughness`` is the total variation (mean
    |difference| of neighbouring points); ``direction_cosine`` checks the axes' orthogonality.
    Each grid point is one forward of the batch through a hook-free copy with the perturbed
    weights passed in (``tensorscope_core.plugin_api.batch_loss``); the model is never modified.
    The state is three copies of the weights: the two directions and the grid point's weights;
    ``direction_dtype='bfloat16'`` keeps the directions at 2 bytes an entry. On a dispatched model every
    weight is loaded onto the input device while the directions are drawn and while a batch's grid is
    evaluated (``trainable_model``).
    """

    name = "landscape.surface_2d"
    version = "1"
    summary = "filter-normalised 2-D loss surface (Li et al. 2018): grid, roughness, loss mean/std"
    Params = SurfaceParams
    artifacts = ("batches",)  # the batches only: it makes its own passes over them
    supports_dispatch = True  # its forwards run on trainable_model, which loads a dispatched model's weights
    fields = {"surface": "loss at theta + alpha*delta + beta*eta, a tensor [grid, grid] (rows alpha, columns beta)",
              "coordinates": "the alpha (= beta) values of the grid",
              "center_loss": "f(0, 0): the model's own loss on the batches used",
              "loss_mean": "mean of the surface over the grid", "loss_std": "its standard deviation",
              "loss_min": "the lowest loss on the grid",
              "roughness": "total variation: mean |f difference| between neighbouring grid points",
              "direction_cosine": "cosine between the two directions (orthogonality check)",
              "batches": "batches the surface averages"}

    @classmethod
    def cost(cls, params: SurfaceParams, view: ModelView, shape: RunShape) -> Cost:
        """The two directions (``delta``, ``eta``: the parameters' bytes each, or 2 bytes an entry in
        bfloat16), the perturbed weights of the grid point being evaluated (``point``: the parameters'
        bytes) and the float64 grid of loss sums. Transient: ``beta * eta`` of the largest parameter while
        the grid point is written (and eta's cast to the parameters' dtype when kept in bfloat16); on a
        dispatched model the weights loaded onto the input device (``offloaded_bytes``)."""
        batches = shape.n_batches if params.max_batches is None else min(shape.n_batches, params.max_batches)
        trainable = [p for p in view.model.parameters() if p.requires_grad]
        n_params = sum(p.numel() for p in trainable)
        point = sum(p.numel() * p.element_size() for p in trainable)
        direction = 2 * n_params if params.direction_dtype == "bfloat16" else point
        largest = max((p.numel() * p.element_size() for p in trainable), default=0)
        temporaries = 2 if params.direction_dtype == "bfloat16" else 1
        forward = 2.0 * n_params * shape.batch_size * shape.seq_len
        return Cost(state_bytes=2 * direction + point + 8 * params.grid**2,
                    transient_bytes=temporaries * largest + offloaded_bytes(view),
                    flops=float(params.grid**2 * batches * forward))

    @classmethod
    def ladder(cls, params: SurfaceParams, view: ModelView, shape: RunShape) -> Sequence[Rung]:
        """Directions in bfloat16: two copies of the weights at 2 bytes an entry instead of the
        parameters' (offered when those are wider)."""
        if params.direction_dtype == "bfloat16" or view.dtype_bytes <= 2:
            return ()
        return (Rung(BF16_DIRECTIONS, params.model_copy(update={"direction_dtype": "bfloat16"}),
                     "directions rounded to bfloat16 (each entry within 2^-9 relative of the seeded one): the "
                     "exact surface along those rounded directions"),)

    @classmethod
    def own_passes(cls, params: SurfaceParams, view: ModelView, shape: RunShape) -> dict[str, int]:
        """One forward per grid point and batch used (the first ``max_batches`` with a loss target):
        ``grid**2 * batches``."""
        return {"replay_forward": params.grid ** 2 * loss_batches(view, shape, params.max_batches)}

    def setup(self) -> None:
        theta = trainable_model(self.view).weights
        gen = torch.Generator().manual_seed(self.params.direction_seed)
        rows = output_row_dims(self.view.model)
        self.delta = self._direction(theta, gen, rows)
        self.eta = self._direction(theta, gen, rows)
        #: the perturbed weights of the grid point being evaluated (one copy, reused)
        self.point = {n: torch.empty_like(t) for n, t in theta.items()}
        self.sums = torch.zeros(self.params.grid, self.params.grid, dtype=torch.float64)
        self.tokens = 0
        self.batches = 0

    def _direction(self, theta: Tensors, gen: torch.Generator, rows: Mapping[str, int]) -> Tensors:
        """The next normalised direction from ``gen`` in ``direction_dtype``, cast at once (before the
        next is drawn, so at most two directions in the parameters' dtype are ever held)."""
        d = normalize_direction(gaussian_direction(theta, gen), theta, rows, self.params.normalization,
                                self.params.one_dim)
        return {n: t.to(torch.bfloat16) for n, t in d.items()} if self.params.direction_dtype == "bfloat16" else d

    def update(self, step: Step) -> None:
        if self.params.max_batches is not None and self.batches >= self.params.max_batches:
            return
        view, batch, targets = self.view, step.batch, step.targets
        n = targets.n_targets
        if n == 0:
            return
        coords = torch.linspace(-self.params.span, self.params.span, self.params.grid, dtype=torch.float64)
        model = trainable_model(view)
        values = surface(lambda p: batch_loss(view, batch, targets, p, model), model.weights, self.delta, self.eta,
                         coords, self.point)
        self.sums += values * n
        self.tokens += n
        self.batches += 1

    def finalize(self) -> dict[str, Any]:
        if self.tokens == 0:
            raise ValueError("no batch had a loss target: the surface needs data with at least two tokens per "
                             "sequence (causal) or a mask token (masked LM)")
        values = self.sums / self.tokens
        centre = self.params.grid // 2
        coords = torch.linspace(-self.params.span, self.params.span, self.params.grid, dtype=torch.float64)
        return {"surface": values, "coordinates": SeriesValue(values=coords.tolist(), index_name="grid point"),
                "center_loss": ScalarValue(value=float(values[centre, centre]), n=self.tokens, unit="nats"),
                "loss_mean": ScalarValue(value=float(values.mean()), unit="nats"),
                "loss_std": ScalarValue(value=float(values.std(unbiased=True)), unit="nats"),
                "loss_min": ScalarValue(value=float(values.min()), unit="nats"),
                "roughness": ScalarValue(value=roughness(values), unit="nats"),
                "direction_cosine": ScalarValue(value=direction_cosine(self.delta, self.eta)),
                "batches": ScalarValue(value=float(self.batches))}
