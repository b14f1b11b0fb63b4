"""fisher.natural_gradient: the K-FAC natural-gradient direction per Linear layer, in the factors' eigenbasis.

For a module with augmented weight ``W̄ = [W | b]`` ``[d_G, d_A]`` and loss gradient ``Γ`` of the same
shape, K-FAC approximates the Fisher of ``vec(W̄)`` (column-major) by ``A ⊗ G``, and
``(A ⊗ G) vec(X) = vec(G X A)``. With ``A = Q_A diag(s_A) Q_Aᵀ`` and ``G = Q_G diag(s_G) Q_Gᵀ``:

- ``damping='eigenvalue'`` (default): the exact inverse of the damped product,
  ``(A ⊗ G + λI)⁻¹ vec(Γ) = vec(Q_G [(Q_Gᵀ Γ Q_A) / (s_G s_Aᵀ + λ)] Q_Aᵀ)`` (George et al. 2018's
  eigenvalue-corrected damping of the Kronecker product);
- ``damping='factored'``: Martens & Grosse 2015 §6.3, ``(A + π√λ I)⁻¹`` and ``(G + √λ/π I)⁻¹`` on
  either side, ``π = sqrt((tr A / d_A) / (tr G / d_G))``: the inverse of
  ``(A + π√λ I) ⊗ (G + √λ/π I)``, which adds cross terms to the damping (``λI`` plus
  ``π√λ I ⊗ G + √λ/π A ⊗ I``).

Neither forms a Kronecker product nor an inverse: two eigendecompositions (``d_A³ + d_G³``) and four
matrix products per module. A factor kept as its diagonal (``diagonal_over``) has the identity as its
eigenbasis and its entries as eigenvalues.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    LayerValue,
    Metric,
    ModelView,
    PreparedData,
    Rung,
    RunShape,
    ScalarValue,
    Step,
    TableValue,
)

from .kfac import FactorParams, diagonal_rungs, selected_modules, zero_factor
from .kfac_stats import ARTIFACT, KfacStats, block_linears, factor_bytes, factor_dims, served_as_asked
from .values import finite_or_none

Damping = Literal["eigenvalue", "factored"]
COLUMNS = ["module", "layer", "grad_norm", "direction_norm", "cosine", "damping", "pi"]


class NaturalGradientParams(FactorParams):
    damping: float = Field(1e-3, gt=0.0, description="λ: Tikhonov damping of A ⊗ G (KFAC-PyTorch's 1e-3)")
    damping_mode: Damping = Field(
        "eigenvalue",
        description="'eigenvalue': (A ⊗ G + λI)⁻¹, exact in the factors' eigenbasis; 'factored': "
        "(A + π√λ I)⁻¹ and (G + √λ/π I)⁻¹ with Martens & Grosse's π-correction",
    )
    keep_direction: bool = Field(
        False,
        description="return the direction of every selected parameter as a "
        "tensor field direction/<parameter>, shaped like it",
    )


def eigenbasis(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(eigenvalues clipped at 0, eigenvectors) of a full factor; (entries, None: the identity) of a diagonal."""
    if factor.ndim == 1:
        return factor.double().clamp_min(0.0), None
    values, vectors = torch.linalg.eigh(factor.double())
    return values.clamp_min(0.0), vectors


def _rotate(x: torch.Tensor, q_g: torch.Tensor | None, q_a: torch.Tensor | None, inverse: bool) -> torch.Tensor:
    """``Q_Gᵀ X Q_A`` (into the eigenbasis) or ``Q_G X Q_Aᵀ`` (back); a None basis is the identity."""
    if q_g is not None:
        x = (q_g if inverse else q_g.T) @ x
    if q_a is not None:
        x = x @ (q_a.T if inverse else q_a)
    return x


def pi_correction(a: torch.Tensor, g: torch.Tensor) -> float:
    """π = sqrt((tr A / d_A) / (tr G / d_G)) (Martens & Grosse 2015 §6.3); 1 when a factor's trace is 0."""
    mean_a = float(a.diagonal().sum() if a.ndim == 2 else a.sum()) / a.shape[0]
    mean_g = float(g.diagonal().sum() if g.ndim == 2 else g.sum()) / g.shape[0]
    return math.sqrt(mean_a / mean_g) if mean_a > 0 and mean_g > 0 else 1.0


def natural_direction(
    grad: torch.Tensor, a: torch.Tensor, g: torch.Tensor, damping: float, mode: Damping
) -> tuple[torch.Tensor, float | None]:
    """The damped K-FAC direction for the gradient ``grad`` [d_G, d_A] (float64) and π (factored mode)."""
    s_a, q_a = eigenbasis(a)
    s_g, q_g = eigenbasis(g)
    pi: float | None = None
    if mode == "eigenvalue":
        denominator = s_g[:, None] * s_a[None, :] + damping
    else:
        pi = pi_correction(a, g)
        root = math.sqrt(damping)
        denominator = (s_g[:, None] + root / pi) * (s_a[None, :] + pi * root)
    return _rotate(_rotate(grad, q_g, q_a, inverse=False) / denominator, q_g, q_a, inverse=True), pi


def augmented_grad(module: torch.nn.Module, grads: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """``[∇W | ∇b]`` as [out, in(+1)] float64 from the gradients of ``name.weight`` (and ``name.bias``)."""
    weight = grads[f"{name}.weight"].double()
    if type(module).__name__ == "Conv1D":  # GPT-2 stores [in, out]
        weight = weight.T
    bias = grads.get(f"{name}.bias")
    return weight if bias is None else torch.cat([weight, bias.double()[:, None]], dim=1)


def split_direction(module: torch.nn.Module, name: str, direction: torch.Tensor) -> dict[str, torch.Tensor]:
    """The direction [out, in(+1)] back as ``{parameter name: tensor shaped like the parameter}``."""
    has_bias = getattr(module, "bias", None) is not None
    weight = direction[:, :-1] if has_bias else direction
    out = {f"{name}.weight": (weight.T if type(module).__name__ == "Conv1D" else weight).contiguous()}
    if has_bias:
        out[f"{name}.bias"] = direction[:, -1].contiguous()
    return out


def _has_grads(view: ModelView, names: list[str]) -> bool:
    modules = block_linears(view)
    return all(modules[n][1].weight.requires_grad for n in names)


class NaturalGradient(Metric):
    """K-FAC natural-gradient direction d = (A ⊗ G + λI)⁻¹ ∇L per Linear/Conv1D module of the blocks.

    ``∇L`` is the gradient of the run's mean token loss (the core's shared ``param_grad``, each batch
    weighted by its targets); ``A``, ``G`` are ``fisher.kfac``'s factors from the same shared
    ``fisher.kfac_stats`` pass (each token position an example, labels drawn from the model: the
    true Fisher per token, the scale of the mean token loss). The direction is computed in the
    factors' eigenbasis (module docstring of ``natural_gradient``), never forming ``A ⊗ G`` or an
    inverse. ``damping_mode='eigenvalue'`` inverts ``A ⊗ G + λI`` exactly;
    ``'factored'`` uses Martens & Grosse's π-corrected factored damping. Reported per module and per
    block: the cosine between d and ∇L (positive: the damped Fisher is positive definite), the two
    norms, λ and π; overall the same over every selected module. The direction is a descent
    direction of the loss for the preconditioned step θ ← θ − η d.
    """

    name = "fisher.natural_gradient"
    supports_dispatch = True  # the shared param_grad, which holds a dispatched model's offloaded weights' too
    version = "1"
    summary = "K-FAC natural-gradient direction per Linear layer (eigenbasis, never the inverse) and its cosine to ∇L"
    Params = NaturalGradientParams
    artifacts = (ARTIFACT, "param_grad")
    fields = {
        "modules": "table: module, layer, grad_norm, direction_norm, cosine, damping, pi (factored mode)",
        "cosine": "per block, cos(d, ∇L) over its selected modules",
        "cosine_overall": "cos(d, ∇L) over every selected module",
        "grad_norm": "||∇L|| over every selected module",
        "direction_norm": "||d|| over every selected module",
        "damping": "λ used",
        "n_examples": "token positions the factors average over",
        "n_targets": "loss targets the gradient averages over",
        "direction/<parameter>": "d for the parameter, shaped like it (keep_direction)",
    }

    @classmethod
    def skip_reason(cls, params: NaturalGradientParams, view: ModelView, data: PreparedData | None) -> str | None:
        names = selected_modules(params, view)
        if not names:
            return (
                f"no Linear/Conv1D module inside the blocks matches modules={list(params.modules)}; names look "
                f"like {list(block_linears(view))[:3] or 'none'}"
            )
        if not _has_grads(view, names):
            return "the selected modules' weights do not require gradients: the run's param_grad has none"
        return None

    @classmethod
    def artifact_requests(cls, params: NaturalGradientParams, view: ModelView) -> dict[str, Any]:
        """The same request as fisher.kfac with these parameters: one kfac_stats pass serves both."""
        return {
            ARTIFACT: {
                "modules": tuple(selected_modules(params, view)),
                "labels": params.labels,
                "diagonal_over": params.diagonal_over,
            }
        }

    @classmethod
    def cost(cls, params: NaturalGradientParams, view: ModelView, shape: RunShape) -> Cost:
        """The factor sums (as fisher.kfac) and the gradient sum [d_G, d_A] per module, float64."""
        modules = block_linears(view)
        dims = [factor_dims(modules[n][1]) for n in selected_modules(params, view)]
        factors = sum(
            factor_bytes(d_a, params.diagonal_over) + factor_bytes(d_g, params.diagonal_over) for d_a, d_g in dims
        )
        grads = sum(8 * d_a * d_g for d_a, d_g in dims)
        flops = sum(10 * (d_a**3 + d_g**3) + 4 * d_a * d_g * (d_a + d_g) for d_a, d_g in dims)
        return Cost(state_bytes=factors + grads + 16, flops=float(flops))

    @classmethod
    def ladder(cls, params: NaturalGradientParams, view: ModelView, shape: RunShape) -> Sequence[Rung]:
        """fisher.kfac's rungs: large factors kept as their diagonals (the gradient sums stay whole)."""
        return diagonal_rungs(params, lambda rung: cls.cost(rung, view, shape).state_bytes,
                              "for those modules the direction preconditions with the factors' diagonals "
                              "(exact where the factor is diagonal); smaller factors exact")

    def setup(self) -> None:
        self.names = selected_modules(self.params, self.view)
        modules = block_linears(self.view)
        self.modules = [modules[n][1] for n in self.names]
        self.layers = [modules[n][0] for n in self.names]
        dims = [factor_dims(m) for m in self.modules]
        self.a_sums = [zero_factor(d_a, self.params.diagonal_over) for d_a, _ in dims]
        self.g_sums = [zero_factor(d_g, self.params.diagonal_over) for _, d_g in dims]
        self.grad_sums = [torch.zeros(d_g, d_a, dtype=torch.float64) for d_a, d_g in dims]
        self.counts = torch.zeros(2, dtype=torch.float64)  # factor examples, loss targets

    def update(self, step: Step) -> None:
        served: KfacStats = step[ARTIFACT]
        grads: dict[str, torch.Tensor] = step["param_grad"]
        n_targets = float(step.targets.n_targets)
        self.counts += torch.tensor([float(served.counts.sum()), n_targets], dtype=torch.float64)
        for i, (name, module) in enumerate(zip(self.names, self.modules, strict=True)):
            a_sum, g_sum = served.of(name)
            self.a_sums[i] += served_as_asked(a_sum.sum(0), self.a_sums[i].ndim).cpu()
            self.g_sums[i] += served_as_asked(g_sum.sum(0), self.g_sums[i].ndim).cpu()
            self.grad_sums[i] += augmented_grad(module, grads, name).cpu() * n_targets

    def finalize(self) -> dict[str, Any]:
        n_examples, n_targets = (float(c) for c in self.counts)
        if n_examples == 0 or n_targets == 0:
            raise ValueError(
                "fisher.natural_gradient saw no loss target: give it sequences of at least two tokens "
                "(causal) or with a mask token (masked LM)"
            )
        damping, mode = self.params.damping, self.params.damping_mode
        rows: list[list[Any]] = []
        out: dict[str, Any] = {}
        n_layers = self.view.n_layers
        sums = torch.zeros(n_layers + 1, 3, dtype=torch.float64)  # per block (last: overall) <d,g>, |d|², |g|²
        for name, module, layer, a_sum, g_sum, grad_sum in zip(
            self.names, self.modules, self.layers, self.a_sums, self.g_sums, self.grad_sums, strict=True
        ):
            grad = grad_sum / n_targets
            direction, pi = natural_direction(grad, a_sum / n_examples, g_sum / n_examples, damping, mode)
            parts = torch.stack([(direction * grad).sum(), direction.pow(2).sum(), grad.pow(2).sum()])
            sums[layer] += parts
            sums[n_layers] += parts
            rows.append(
                [name, layer, math.sqrt(float(parts[2])), math.sqrt(float(parts[1])), _cosine(parts), damping, pi]
            )
            if self.params.keep_direction:
                out.update({f"direction/{k}": v for k, v in split_direction(module, name, direction).items()})
        used = sorted(set(self.layers))
        out["modules"] = TableValue(
            columns=COLUMNS, rows=[[finite_or_none(x) if isinstance(x, float) else x for x in row] for row in rows]
        )
        out["cosine"] = LayerValue(values=[_cosine(sums[i]) for i in used], labels=[str(i) for i in used], axis="block")
        out["cosine_overall"] = ScalarValue(value=_cosine(sums[n_layers]))
        out["grad_norm"] = ScalarValue(value=math.sqrt(float(sums[n_layers, 2])))
        out["direction_norm"] = ScalarValue(value=math.sqrt(float(sums[n_layers, 1])))
        out["damping"] = ScalarValue(value=damping)
        out["n_examples"] = ScalarValue(value=n_examples, n=int(n_examples))
        out["n_targets"] = ScalarValue(value=n_targets, n=int(n_targets))
        return out


def _cosine(parts: torch.Tensor) -> float | None:
    """<d, g> / (|d| |g|) from (<d, g>, |d|², |g|²); None when either is zero."""
    norm = math.sqrt(float(parts[1]) * float(parts[2]))
    return float(parts[0]) / norm if norm > 0 else None
