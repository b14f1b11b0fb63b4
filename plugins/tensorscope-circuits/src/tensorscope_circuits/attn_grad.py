"""circuits.attn_x_grad: attention x gradient per head, captured in the run's shared backward.

The core's ``attn_pattern`` is detached, and no core artifact carries the gradient of the loss
with respect to the attention probabilities. This artifact takes both from the shared
forward+backward the run makes anyway: a forward hook on each attention module registers a
tensor hook on the probabilities it returns (the eager kernel returns the very tensor it
multiplies the values with), and that hook reduces A * dL/dA to two numbers per example and head
as the gradient arrives. No pass of its own, and nothing of size seq^2 outlives the backward.
"""

from __future__ import annotations

from typing import Any

import torch

from tensorscope_core.plugin_api import ArtifactSpec, CaptureContext, ModelView

ATTN_X_GRAD = "circuits.attn_x_grad"


def head_sums(attn: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """[batch, heads, 2]: sum over queries and keys of A * g and of |A * g| (float64).

    Entries that cannot move the loss (masked keys: A = 0; padded queries: g = 0) add 0, so no mask
    is needed."""
    product = attn.double() * grad.double()
    return torch.stack([product.sum(dim=(-2, -1)), product.abs().sum(dim=(-2, -1))], dim=-1)


def _install(ctx: CaptureContext) -> None:
    n, heads = ctx.view.n_layers, ctx.view.n_heads
    for layer, module in enumerate(ctx.view.attn):
        def hook(module: Any, args: tuple, kwargs: dict, output: Any, layer: int = layer) -> None:
            if not ctx.grad_enabled:
                return
            weights = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
            if isinstance(weights, torch.Tensor) and weights.dim() == 4 and weights.shape[1] == heads \
                    and weights.requires_grad:
                attn = weights.detach()  # the same storage autograd keeps for the value product
                weights.register_hook(lambda g: ctx.keep(ATTN_X_GRAD, layer, head_sums(attn, g), n))
        ctx.forward_hook(module, hook)


def _check(ctx: CaptureContext) -> None:
    """After each micro-batch's backward: every layer got its gradient. Raising here (not in the hook,
    inside the model's forward) fails only the metrics that read this artifact."""
    slots = ctx.store.get(ATTN_X_GRAD)
    missing = list(range(ctx.view.n_layers)) if slots is None else [i for i, s in enumerate(slots) if s is None]
    if missing:
        raise RuntimeError(f"{ctx.view.name}: the attention modules of layers {missing} returned no attention "
                           f"probabilities [batch, {ctx.view.n_heads}, seq, seq] that the loss depends on; "
                           "load the model with attn_implementation='eager'")


def _nbytes(view: ModelView, batch: int, seq: int) -> int:
    return view.n_layers * batch * view.n_heads * 2 * 8


def _transient(view: ModelView, rows: int, seq: int, request: Any) -> int:
    """One layer at a time: A and dL/dA in float64 and their product, [rows, heads, seq, seq] each."""
    return 3 * rows * view.n_heads * seq * seq * 8


ATTN_X_GRAD_SPEC = ArtifactSpec(
    name=ATTN_X_GRAD,
    pass_kind="backward",
    doc="per layer [batch, heads, 2]: sum over queries and keys of A * dL/dA and of |A * dL/dA| "
        "(A: attention probabilities, L: the batch-mean token loss of the shared backward)",
    nbytes=_nbytes,
    install=_install,
    derive=_check,
    requires=("token_loss",),
    forward_kwargs=(("output_attentions", True),),
    transient_nbytes=_transient,
)
