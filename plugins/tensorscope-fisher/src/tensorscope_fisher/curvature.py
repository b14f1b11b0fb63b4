"""fisher.lanczos and hessian.lanczos: top eigenpairs of the full-parameter Fisher (GGN) and of the
loss Hessian, matrix-free, by Lanczos with selective reorthogonalisation (``lanczos.py``).

Both use the same loss over the examples the metric kept (the first ``max_examples``):

    L(theta) = (1 / N) sum_i l_i(theta),   l_i = sum_t m_it CE(logits_it, y_it)

with ``per='example'`` (N the number of examples with targets: the normalisation of
``fisher.diagonal``, so the Fisher's trace is ``fisher.diagonal``'s ``true_trace`` in
expectation), or N the number of target tokens with ``per='token'`` (the run's token loss,
``basic.loss``). The Fisher is the generalised Gauss-Newton matrix of L,
G = (1/N) sum_i sum_t J_it^T (diag p_it - p_it p_it^T) J_it (J_it = d logits_it / d theta), which is
the true Fisher of the model's next-token distributions given the contexts; the Hessian is
G plus the terms of the logits' curvature weighted by the residuals p - e_y.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch.func import functional_call, grad, jvp, vjp

from tensorscope_core.plugin_api import (
    Cost,
    LossTargets,
    Metric,
    ModelView,
    Params,
    RunShape,
    ScalarValue,
    SeriesValue,
    Step,
    hook_free_copy,
)

from .fisher_grads import layout_of, layout_size
from .lanczos import top_eigenpairs

Weights = dict[str, torch.Tensor]
Examples = list[tuple[LossTargets, torch.Tensor]]  # (targets, attention mask) per kept batch


class CurvatureParams(Params):
    k: int = Field(10, ge=1, description="number of top eigenpairs")
    max_iter: int = Field(100, ge=1, description="most Lanczos iterations (matrix-vector products)")
    tol: float = Field(1e-6, gt=0.0, description="stop when every Ritz residual bound is at most tol x ||T||")
    max_examples: int | None = Field(64, ge=1, description="the first this many examples of the run; None: all")
    per: Literal["example", "token"] = Field(
        "example", description="normalise the loss per example (as fisher.diagonal) or per target token (basic.loss)")
    keep_vectors: bool = Field(False, description="also return the eigenvectors [n_params, k] (a tensor field)")
    seed: int = Field(0, description="seed of the Lanczos start vector")


def room_for(params: CurvatureParams, stored: int, rows: int) -> int:
    """Rows of the next batch ``update`` keeps: up to ``max_examples`` in all (every row when None)."""
    return rows if params.max_examples is None else min(rows, params.max_examples - stored)


def kept_batches(params: CurvatureParams, shape: RunShape) -> int:
    """How many of the run's batches ``update`` keeps (every batch until ``max_examples`` rows
    are kept; every batch with ``max_examples=None``)."""
    kept = stored = 0
    for rows, _, _ in shape.batches:
        room = room_for(params, stored, rows)
        if room > 0:
            kept += 1
            stored += room
    return kept


class _Lanczos(Metric):
    """Keeps the examples' inputs per batch; finalize runs Lanczos on ``matvec``."""

    Params = CurvatureParams
    #: calls of the model per Lanczos product and kept batch
    calls_per_product: ClassVar[int] = 1
    artifacts = ("batches",)  # the batches only: it makes its own passes over them
    fields = {
        "eigenvalues": "the k largest eigenvalues, descending",
        "residual_norms": "||A v - lambda v|| of each returned eigenpair (unit v)",
        "lambda_max": "the largest eigenvalue",
        "iterations": "Lanczos iterations (matrix-vector products)",
        "converged": "1 when every pair met tol, else 0",
        "n_examples": "examples used",
        "eigenvectors": "[n_params, k], trainable parameters in named_parameters order (keep_vectors only)",
    }

    @classmethod
    def cost(cls, params: CurvatureParams, view: ModelView, shape: RunShape) -> Cost:
        examples = min(shape.n_sequences, params.max_examples or shape.n_sequences)
        tokens = examples * shape.seq_len
        # kept per token: input ids, targets, target mask, attention mask (int64); per product
        # about two forwards and two backwards of the kept tokens
        return Cost(state_bytes=4 * 8 * tokens, flops=float(params.max_iter * 8 * view.n_params * tokens))

    @classmethod
    def own_passes(cls, params: CurvatureParams, view: ModelView, shape: RunShape) -> dict[str, int]:
        """``calls_per_product`` calls of the (hook-free copy of the) model per Lanczos product and
        kept batch (``kept_batches``), all differentiated: ``replay_backward``. The products are at most
        ``min(max(max_iter, k), n_params)``; Lanczos stops earlier when every Ritz pair meets ``tol``
        (known only at run time, reported in ``iterations``), so this is the planned maximum. None when
        ``k`` exceeds the trainable parameters (finalize refuses before any product)."""
        size = layout_size(layout_of(view))
        if params.k > size:
            return {}
        products = min(max(params.max_iter, params.k), size)
        return {"replay_backward": cls.calls_per_product * products * kept_batches(params, shape)}

    def setup(self) -> None:
        self.inputs: list[torch.Tensor] = []
        self.attention: list[torch.Tensor] = []
        self.target_ids: list[torch.Tensor] = []
        self.target_masks: list[torch.Tensor] = []

    def update(self, step: Step) -> None:
        room = room_for(self.params, sum(len(x) for x in self.inputs), step.batch.input_ids.shape[0])
        if room <= 0:
            return
        targets = step.targets.slice(0, room)  # the run's own targets
        self.inputs.append(targets.model_input.detach().cpu())
        self.target_ids.append(targets.target_ids.detach().cpu())
        self.target_masks.append(targets.target_mask.detach().cpu())
        self.attention.append(step.batch.attention_mask[:room].detach().cpu())

    def matvec_factory(self, model: torch.nn.Module, weights: Weights, examples: Examples,
                       scale: float) -> Callable[[Weights], Weights]:
        raise NotImplementedError

    def finalize(self) -> dict[str, Any]:
        view = self.view
        layout = layout_of(view)
        size = layout_size(layout)
        params = dict(view.model.named_parameters())
        weights = {n: params[n].detach() for n in layout}
        device, dtype = next(iter(weights.values())).device, next(iter(weights.values())).dtype
        examples: Examples = [(LossTargets(i.to(device), t.to(device), m.to(device)), a.to(device))
                              for i, t, m, a in zip(self.inputs, self.target_ids, self.target_masks, self.attention,
                                                    strict=True)]
        n_examples = sum(int((t.target_mask.sum(dim=1) > 0).sum()) for t, _ in examples)
        n_tokens = sum(t.n_targets for t, _ in examples)
        if n_examples == 0:
            raise ValueError(f"{self.name} saw no example with a loss target: give it sequences of at least "
                             "two tokens (causal models) or a tokenizer with a mask token (encoders)")
        if self.params.k > size:
            raise ValueError(f"k={self.params.k} exceeds the {size} trainable parameters of {view.name}")
        scale = 1.0 / (n_examples if self.params.per == "example" else n_tokens)
        product = self.matvec_factory(hook_free_copy(view), weights, examples, scale)

        def matvec(v: torch.Tensor) -> torch.Tensor:
            tangent = {n: v[sl].reshape(shape).to(dtype) for n, (sl, shape) in layout.items()}
            out = product(tangent)
            return torch.cat([out[n].reshape(-1) for n in layout]).to(v.dtype)

        # transformers computes norms (LLaMA's RMSNorm), softmaxes and rotary tables in float32 even
        # in float64 models: the products are no more accurate than float32
        precision = max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
        result = top_eigenpairs(matvec, size, self.params.k, max_iter=max(self.params.max_iter, self.params.k),
                                tol=self.params.tol, seed=self.params.seed, device=device, precision=precision)
        values = result.eigenvalues.tolist()
        out: dict[str, Any] = {
            "eigenvalues": SeriesValue(values=values, index_name="rank"),
            "residual_norms": SeriesValue(values=result.residual_norms.tolist(), index_name="rank"),
            "lambda_max": ScalarValue(value=values[0]),
            "iterations": ScalarValue(value=float(result.iterations)),
            "converged": ScalarValue(value=float(result.converged)),
            "n_examples": ScalarValue(value=float(n_examples)),
        }
        if self.params.keep_vectors:
            out["eigenvectors"] = result.eigenvectors.cpu()
        for name in ("inputs", "attention", "target_ids", "target_masks"):
            getattr(self, name).clear()
        return out


def _logits_fn(model: torch.nn.Module, targets: LossTargets, attention: torch.Tensor) -> Callable[[Weights], Any]:
    def logits(w: Weights) -> torch.Tensor:
        out = functional_call(model, w, args=(), strict=False,
                              kwargs={"input_ids": targets.model_input, "attention_mask": attention,
                                      "use_cache": False})
        z = out.logits
        return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
    return logits


def ggn_product(logits: Callable[[Weights], torch.Tensor], weights: Weights, target_mask: torch.Tensor,
                scale: float) -> Callable[[Weights], Weights]:
    """v -> scale sum_t J_t^T (diag p_t - p_t p_t^T) J_t v over the positions where ``target_mask`` is 1:
    the Gauss-Newton product of the summed cross-entropy of ``logits(weights)`` [..., vocab]; one JVP
    (J v) and one VJP (J^T u), never a Jacobian."""
    def product(v: Weights) -> Weights:
        z, jv = jvp(logits, (weights,), (v,))[:2]
        p = torch.softmax(z.detach(), dim=-1)
        u = (p * jv - p * (p * jv).sum(dim=-1, keepdim=True)) * (target_mask.to(p.dtype)[..., None] * scale)
        _, pullback = vjp(logits, weights)[:2]
        return dict(pullback(u.to(z.dtype))[0])
    return product


def hessian_product(loss: Callable[[Weights], torch.Tensor], weights: Weights) -> Callable[[Weights], Weights]:
    """v -> H v for the Hessian H of the scalar ``loss`` at ``weights``: forward-over-reverse
    (``torch.func.jvp`` of ``grad``)."""
    def product(v: Weights) -> Weights:
        return dict(jvp(grad(loss), (weights,), (v,))[1])
    return product


def _summed(products: list[Callable[[Weights], Weights]]) -> Callable[[Weights], Weights]:
    def product(v: Weights) -> Weights:
        total: Weights = {}
        for part in products:
            for n, x in part(v).items():
                total[n] = total[n] + x if n in total else x
        return total
    return product


class FisherLanczos(_Lanczos):
    """Top-k eigenpairs of the full-parameter Fisher, matrix-free: the GGN product
    G v = (1/N) sum_i sum_t J_it^T (diag p_it - p_it p_it^T) J_it v, one JVP (J v) and one VJP (J^T u)
    through the model per kept batch, p = softmax(logits) over the target positions (see the
    module docstring for N and ``per``). G is the true Fisher: its diagonal is what
    ``fisher.diagonal``'s ``true`` fields estimate by sampling (``per='example'``). Lanczos with
    selective reorthogonalisation; ``residual_norms`` are the true ||G v - lambda v||.
    """

    name = "fisher.lanczos"
    version = "1"
    summary = "top-k eigenvalues of the full-parameter Fisher (GGN products J^T H J v), Lanczos"
    calls_per_product = 2  # torch.func.jvp and vjp: one forward each

    def matvec_factory(self, model: torch.nn.Module, weights: Weights, examples: Examples,
                       scale: float) -> Callable[[Weights], Weights]:
        # per product and kept batch: one JVP and one VJP (two forwards, nothing kept between products)
        return _summed([ggn_product(_logits_fn(model, t, a), weights, t.target_mask, scale) for t, a in examples])


class HessianLanczos(_Lanczos):
    """Top-k (largest algebraic) eigenpairs of the Hessian of the loss L (module docstring: the
    examples' summed token NLL averaged per example, or per token with ``per='token'``), from
    Hessian-vector products by forward-over-reverse differentiation (``torch.func.jvp`` of
    ``grad``) per kept batch. Negative eigenvalues come last; ``residual_norms`` are the true
    ||H v - lambda v||. With ``per='token'`` this is the Hessian of ``basic.loss``'s loss.
    """

    name = "hessian.lanczos"
    version = "1"
    summary = "top-k eigenvalues of the loss Hessian (Hessian-vector products), Lanczos"
    calls_per_product = 1  # torch.func.jvp of grad: one forward

    def matvec_factory(self, model: torch.nn.Module, weights: Weights, examples: Examples,
                       scale: float) -> Callable[[Weights], Weights]:
        def loss_of(targets: LossTargets, attention: torch.Tensor) -> Callable[[Weights], torch.Tensor]:
            f = _logits_fn(model, targets, attention)

            def loss(w: Weights) -> torch.Tensor:
                z = f(w)
                ce = torch.nn.functional.cross_entropy(z.transpose(1, 2), targets.target_ids, reduction="none")
                return (ce * targets.target_mask.to(ce.dtype)).sum() * scale
            return loss

        return _summed([hessian_product(loss_of(t, a), weights) for t, a in examples])
