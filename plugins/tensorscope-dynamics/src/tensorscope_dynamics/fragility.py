"""dynamics.fragility: how far the predictions move under noise on the input embeddings and
under filter-normalised weight perturbations, as JSD curves in bits."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from pydantic import Field, model_validator

from tensorscope_core.plugin_api import (
    Cost,
    LossTargets,
    Metric,
    ModelView,
    OneDeviceModel,
    Params,
    RunShape,
    ScalarValue,
    Step,
    TableValue,
    batch_logits,
    bootstrap_ci,
    forward_act_bytes,
    js_divergence_bits,
    offloaded_bytes,
)

CURVE_COLUMNS = ["level", "jsd_bits", "ci_low", "ci_high", "n_sequences"]


class FragilityParams(Params):
    sigmas: list[float] = Field(
        [0.01, 0.03, 0.1, 0.3],
        min_length=1,
        description="input noise levels: e + sigma * rms(e) * eps on the token embeddings",
    )
    rhos: list[float] = Field(
        [0.01, 0.03, 0.1], min_length=1, description="weight perturbation sizes: theta + rho * d, d filter-normalised"
    )
    n_directions: int = Field(2, ge=1, description="random weight directions averaged per rho")
    max_batches: int = Field(4, ge=1, description="batches the curves are measured on")

    @model_validator(mode="after")
    def _non_negative(self) -> FragilityParams:
        if min(self.sigmas) < 0 or min(self.rhos) < 0:
            raise ValueError("sigmas and rhos must be >= 0")
        return self


def _direction(weights: dict[str, torch.Tensor], index: int, seed: int) -> dict[str, torch.Tensor]:
    """A seeded Gaussian direction, filter-normalised (Li et al. 2018): each row (output filter)
    of every parameter with 2+ dimensions gets the norm of that row of the weights; 1-D
    parameters (biases, norm gains) are not moved."""
    gen = torch.Generator().manual_seed(seed * 7919 + index)
    out = {}
    for name, p in weights.items():
        if p.dim() < 2:
            continue
        d = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device, p.dtype)
        rows, theta = d.reshape(d.shape[0], -1), p.reshape(p.shape[0], -1)
        scale = theta.norm(dim=1, keepdim=True) / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        out[name] = (rows * scale).reshape(p.shape)
    return out


@contextmanager
def _noisy_embeddings(model: OneDeviceModel, sigma: float, gen: torch.Generator) -> Iterator[None]:
    """``model``'s copy with e + sigma * rms(e) * eps at its token embedding output (no capture hooks there)."""

    def add_noise(_module: Any, _args: Any, output: torch.Tensor) -> torch.Tensor:
        eps = torch.randn(output.shape, generator=gen, dtype=torch.float32).to(output.device, output.dtype)
        rms = output.detach().float().square().mean(-1, keepdim=True).sqrt().to(output.dtype)
        return output + sigma * rms * eps

    handle = model.view.embed.register_forward_hook(add_noise)
    try:
        yield
    finally:
        handle.remove()


def _per_sequence(jsd: torch.Tensor, targets: LossTargets) -> torch.Tensor:
    """Mean JSD over each sequence's target positions [batch] (NaN for a sequence without targets)."""
    mask = targets.target_mask.double().cpu()
    return (jsd.cpu() * mask).sum(1) / mask.sum(1)


class Fragility(Metric):
    """Alignment fragility: F(sigma) = E JSD(p(. | e) || p(. | e + sigma rms(e) eps)) in bits
    over the run's target positions, with Gaussian eps added to the token embeddings (rms(e) per
    token), and F(rho) = E_d JSD(p_theta || p_{theta + rho d}) over ``n_directions`` seeded
    Gaussian directions d, filter-normalised (every row of every weight matrix scaled to the
    norm of that row of theta; 1-D parameters are not moved). Each point is the mean over
    sequences of their mean JSD, with a bootstrap CI over sequences; p is the shared forward's.
    JSD is in [0, 1] bits (scipy's ``jensenshannon`` is its square root). The scalars are the
    values at the largest sigma and rho, with per-sequence samples.
    """

    name = "dynamics.fragility"
    version = "1"
    summary = "JSD (bits) of predictions under embedding noise and filter-normalised weight noise"
    Params = FragilityParams
    artifacts = ("logits",)
    supports_dispatch = True  # its forwards run on OneDeviceModel (a dispatched model's weights loaded per batch)
    fields = {
        "input_curve": "table level (sigma), jsd_bits, ci_low, ci_high, n_sequences",
        "weight_curve": "table level (rho), jsd_bits, ci_low, ci_high, n_sequences",
        "input_fragility": "F at the largest sigma (bits)",
        "weight_fragility": "F at the largest rho (bits)",
    }

    @classmethod
    def _batches(cls, params: FragilityParams, shape: RunShape) -> int:
        return min(params.max_batches, shape.n_batches)

    @classmethod
    def own_passes(cls, params: FragilityParams, view: ModelView, shape: RunShape) -> dict[str, int]:
        per_batch = len(params.sigmas) + params.n_directions * len(params.rhos)
        return {"replay_forward": per_batch * cls._batches(params, shape)}

    @classmethod
    def cost(cls, params: FragilityParams, view: ModelView, shape: RunShape) -> Cost:
        rows = cls._batches(params, shape) * shape.batch_size
        # per batch: a weight direction and the moved weights, beside them while either is built the random
        # draw and its scaled rows (or rho x direction) of the largest weight; float64 softmaxes p and q with
        # the three temporaries of their JS divergence (the mixture and two xlogy terms), and the perturbed
        # forward itself
        probs = 8 * shape.batch_size * shape.seq_len * view.vocab_size
        # and, on a dispatched model, every weight loaded onto the input device for the batch (OneDeviceModel)
        largest = max(p.numel() * p.element_size() for p in view.model.parameters())
        working = (2 * view.every_param_bytes + 2 * largest + 5 * probs + offloaded_bytes(view)
                   + forward_act_bytes(view, shape.batch_size, shape.seq_len))
        return Cost(state_bytes=8 * rows * (len(params.sigmas) + len(params.rhos)), transient_bytes=working)

    def setup(self) -> None:
        rows = self._batches(self.params, self.shape) * self.shape.batch_size
        self.input_jsd = torch.full((len(self.params.sigmas), rows), float("nan"), dtype=torch.float64)
        self.weight_jsd = torch.full((len(self.params.rhos), rows), float("nan"), dtype=torch.float64)
        self.filled = 0
        self.batches = 0

    def update(self, step: Step) -> None:
        if self.batches >= self.params.max_batches:
            return
        targets = step.targets
        p = torch.softmax(step["logits"].double(), dim=-1)
        rows = slice(self.filled, self.filled + p.shape[0])
        gen = torch.Generator().manual_seed(self.shape.seed * 1_000_003 + step.batch.index)
        # the model without capture hooks (a dispatched one's weights loaded onto the input device)
        model = OneDeviceModel(self.view, [name for name, _ in self.view.named_parameters()])
        with torch.no_grad():
            for i, sigma in enumerate(self.params.sigmas):
                with _noisy_embeddings(model, sigma, gen):
                    logits = batch_logits(self.view, step.batch, targets, model=model)
                q = torch.softmax(logits.double(), dim=-1)
                self.input_jsd[i, rows] = _per_sequence(js_divergence_bits(p, q), targets)
            sums = torch.zeros(len(self.params.rhos), p.shape[0], dtype=torch.float64)
            for k in range(self.params.n_directions):
                sums += self._along_direction(k, step, p, model)
            self.weight_jsd[:, rows] = sums / self.params.n_directions
        self.filled += p.shape[0]
        self.batches += 1

    def _along_direction(self, k: int, step: Step, p: torch.Tensor, model: OneDeviceModel) -> torch.Tensor:
        """JSD per sequence [rhos, batch] of the weights moved by rho along direction ``k``. One direction
        and one moved copy of the weights live at a time: each is built in a call whose return frees it
        (a loop variable would keep the previous copy alive while the next one is built)."""
        direction = _direction(model.weights, k, self.shape.seed)
        return torch.stack([self._moved_jsd(direction, rho, step, p, model) for rho in self.params.rhos])

    def _moved_jsd(self, direction: dict[str, torch.Tensor], rho: float, step: Step, p: torch.Tensor,
                   model: OneDeviceModel) -> torch.Tensor:
        moved = {n: model.weights[n] + rho * d for n, d in direction.items()}
        q = torch.softmax(batch_logits(self.view, step.batch, step.targets, moved, model).double(), dim=-1)
        return _per_sequence(js_divergence_bits(p, q), step.targets)

    def _curve(self, levels: list[float], jsd: torch.Tensor) -> tuple[TableValue, ScalarValue]:
        rows, last = [], None
        for level, values in zip(levels, jsd[:, : self.filled], strict=True):
            x = values[~values.isnan()].numpy()
            low, high = bootstrap_ci(x, seed=self.shape.seed)
            rows.append([level, float(x.mean()), low, high, len(x)])
            last = ScalarValue(
                value=float(x.mean()),
                ci_low=low,
                ci_high=high,
                n=len(x),
                unit="bits",
                samples=[None if v != v else float(v) for v in values.tolist()[: self.filled]],
            )
        assert last is not None
        return TableValue(columns=CURVE_COLUMNS, rows=rows), last

    def finalize(self) -> dict[str, Any]:
        if self.filled == 0:
            raise ValueError("no batches: fragility needs data")
        if bool(self.input_jsd[0, : self.filled].isnan().all()):
            raise ValueError("no sequence has a loss target: fragility is measured on target positions")
        order_in = sorted(range(len(self.params.sigmas)), key=lambda i: self.params.sigmas[i])
        order_w = sorted(range(len(self.params.rhos)), key=lambda i: self.params.rhos[i])
        input_curve, input_last = self._curve([self.params.sigmas[i] for i in order_in], self.input_jsd[order_in])
        weight_curve, weight_last = self._curve([self.params.rhos[i] for i in order_w], self.weight_jsd[order_w])
        return {
            "input_curve": input_curve,
            "weight_curve": weight_curve,
            "input_fragility": input_last,
            "weight_fragility": weight_last,
        }
