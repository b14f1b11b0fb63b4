"""The ``per_sample_grad`` artifact: per-example gradients, computed once per batch and shared.

The per-example loss is the core's token loss (``tensorscope_core.core_artifacts.loss_targets``:
next-token cross-entropy over the target mask for causal models, the seeded masked
positions for masked-LM encoders) averaged over *that example's* target tokens:

    l_i(theta) = sum_t m_it * CE(logits_it, y_it) / max(1, sum_t m_it)

so the core's ``param_grad`` (the gradient of the batch-mean token loss) equals
sum_i T_i g_i / sum_i T_i with T_i the example's number of targets. An example without
targets has loss 0 and a zero gradient.

The gradients come from the core's ``tensorscope_core.per_example.per_example_grads``:
``torch.func`` ``vmap`` over the rows of each micro-batch, through ``functional_call`` on a
hook-free shallow copy of the model that shares its parameter tensors (so the capture hooks
of the shared run never see these extra forwards). Models whose forward branches on the
data under ``vmap`` (transformers' bidirectional mask for BERT-style encoders) fall back to
a loop of single-example calls, with the same numbers.

Value: a list ``[grads, loss, n_targets]``: ``grads`` [batch, P] in the model's dtype,
flattened in the layout of ``requested_layout(view)``; ``loss`` [batch] and ``n_targets``
[batch] in float64. Consumers declare the parameters they need with
``request_parameters`` in ``setup()``; the artifact then differentiates only the union of
those requests (all trainable parameters when any consumer asks for all, or none asked).
Consumers must not modify the tensors in place (the plugin's stores keep them uncopied).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

from tensorscope_core import ArtifactSpec, ModelView
from tensorscope_core.artifacts import act_bytes
from tensorscope_core.capture import CaptureContext
from tensorscope_core.per_example import per_example_grads as core_per_example_grads

from .selection import Layout, layout_of

ARTIFACT = "per_sample_grad"
_REQUESTS = "tensorscope_gradients.per_sample.requests"
_LAYOUTS = "tensorscope_gradients.per_sample.layouts"


def request_parameters(view: ModelView, consumer: str, names: Sequence[str] | None) -> None:
    """Ask the artifact for the gradients of ``names`` (None: every trainable parameter)."""
    view.extras.setdefault(_REQUESTS, {})[consumer] = None if names is None else tuple(names)


def release_parameters(view: ModelView, consumer: str) -> None:
    view.extras.get(_REQUESTS, {}).pop(consumer, None)


def requested_layout(view: ModelView) -> Layout:
    """The layout of the artifact's vectors: the union of the consumers' requests."""
    requests = view.extras.get(_REQUESTS, {})
    if not requests or any(v is None for v in requests.values()):
        key: frozenset[str] | None = None
    else:
        key = frozenset(itertools.chain.from_iterable(v for v in requests.values() if v is not None))
    layouts: dict[Any, Layout] = view.extras.setdefault(_LAYOUTS, {})
    if key not in layouts:
        layouts[key] = layout_of(view, None if key is None else sorted(key))
    return layouts[key]


def _mean_token_loss(logits: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """One example's mean token cross-entropy over its targets (0 without targets)."""
    ce = torch.nn.functional.cross_entropy(logits, target_ids, reduction="none")
    weights = target_mask.to(ce.dtype)
    return (ce * weights).sum() / weights.sum().clamp(min=1)


def per_example_grads(view: ModelView, layout: Layout, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      target_ids: torch.Tensor, target_mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example gradients [batch, layout.size], losses [batch] and target counts [batch].

    Rows of the inputs are examples; the loss of an example is its mean token
    cross-entropy over its targets (see the module docstring).
    """
    (flat,), loss = core_per_example_grads(view, layout.names, _mean_token_loss, input_ids, attention_mask,
                                           target_ids, target_mask)
    return flat, loss[:, 0], target_mask.sum(dim=1).double().cpu()


def _derive(ctx: CaptureContext) -> None:
    assert ctx.batch is not None
    targets = ctx.store["_targets"]
    layout = requested_layout(ctx.view)
    flat, loss, n_targets = per_example_grads(ctx.view, layout, targets.model_input, ctx.batch.attention_mask,
                                              targets.target_ids, targets.target_mask)
    ctx.store[ARTIFACT] = [flat, loss, n_targets]


def _bytes(view: ModelView, batch: int, seq: int) -> int:
    # the batch's gradients, plus what the vmapped backward keeps (as a backward of the batch)
    return batch * view.n_params * view.dtype_bytes + act_bytes(view, batch, seq)


PER_SAMPLE_GRAD = ArtifactSpec(
    ARTIFACT, "forward",
    "per-example gradients of each example's mean token loss (torch.func vmap of grad): "
    "[grads [batch, P], loss [batch], n_targets [batch]]",
    _bytes, derive=_derive)
