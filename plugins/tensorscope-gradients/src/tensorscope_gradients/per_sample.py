"""The ``per_sample_grad`` artifact: per-example gradients, computed once per batch and shared.

The per-example loss is the core's token loss (``tensorscope_core.core_artifacts.loss_targets``:
next-token cross-entropy over the target mask for causal models, the seeded masked
positions for masked-LM encoders) averaged over *that example's* target tokens:

    l_i(theta) = sum_t m_it * CE(logits_it, y_it) / max(1, sum_t m_it)

so the core's ``param_grad`` (the gradient of the batch-mean token loss) equals
sum_i T_i g_i / sum_i T_i with T_i the example's number of targets. An example without
targets has loss 0 and a zero gradient.

The gradients come from ``torch.func``: ``vmap(grad(l))`` over the rows of each
micro-batch, through ``functional_call`` on a hook-free shallow copy of the model that
shares its parameter tensors (so the capture hooks of the shared run never see these
extra forwards). Models whose forward branches on the data under ``vmap`` (transformers'
bidirectional mask for BERT-style encoders) fall back to a loop of single-example
``grad`` calls, with the same numbers.

Value: a list ``[grads, loss, n_targets]``: ``grads`` [batch, P] in the model's dtype,
flattened in the layout of ``requested_layout(view)``; ``loss`` [batch] and ``n_targets``
[batch] in float64. Consumers declare the parameters they need with
``request_parameters`` in ``setup()``; the artifact then differentiates only the union of
those requests (all trainable parameters when any consumer asks for all, or none asked).
Consumers must not modify the tensors in place (the plugin's stores keep them uncopied).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence
from typing import Any

import torch
from torch.func import functional_call, grad, vmap

from tensorscope_core import ArtifactSpec, ModelView
from tensorscope_core.artifacts import act_bytes
from tensorscope_core.capture import CaptureContext

from .selection import Layout, layout_of

ARTIFACT = "per_sample_grad"
_REQUESTS = "tensorscope_gradients.per_sample.requests"
_LAYOUTS = "tensorscope_gradients.per_sample.layouts"
_SHADOW = "tensorscope_gradients.per_sample.shadow"
_LOOP = "tensorscope_gradients.per_sample.loop"
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
               "_backward_pre_hooks")


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


def _shadow(view: ModelView) -> torch.nn.Module:
    """A copy of the module tree without hooks that shares every parameter and buffer tensor."""
    shadow = view.extras.get(_SHADOW)
    if shadow is None:
        model = view.model
        memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
        shadow = copy.deepcopy(model, memo)
        for module in shadow.modules():
            for attr in _HOOK_DICTS:
                hooks = getattr(module, attr, None)
                if hooks is not None:
                    setattr(module, attr, type(hooks)())
        view.extras[_SHADOW] = shadow
    return shadow


def per_example_grads(view: ModelView, layout: Layout, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      target_ids: torch.Tensor, target_mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example gradients [batch, layout.size], losses [batch] and target counts [batch].

    Rows of the inputs are examples; the loss of an example is its mean token
    cross-entropy over its targets (see the module docstring).
    """
    model = _shadow(view)
    params = dict(view.model.named_parameters())
    wanted = {n: params[n].detach() for n in layout.names}
    fixed: dict[str, torch.Tensor] = {n: p.detach() for n, p in params.items() if n not in wanted}
    fixed.update({n: b.detach() for n, b in view.model.named_buffers()})

    def loss_one(w: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, tgt: torch.Tensor,
                 tmask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = functional_call(model, (w, fixed), args=(),
                              kwargs={"input_ids": ids[None], "attention_mask": mask[None], "use_cache": False})
        logits = out.logits[0]
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # as the core's token loss
        ce = torch.nn.functional.cross_entropy(logits, tgt, reduction="none")
        weights = tmask.to(ce.dtype)
        loss = (ce * weights).sum() / weights.sum().clamp(min=1)
        return loss, loss.detach()

    step = grad(loss_one, has_aux=True)
    args = (input_ids, attention_mask, target_ids, target_mask)
    grads: dict[str, torch.Tensor]
    if not view.extras.get(_LOOP):
        try:
            grads, loss = vmap(step, in_dims=(None, 0, 0, 0, 0))(wanted, *args)
        except RuntimeError as exc:
            if "vmap" not in str(exc):
                raise
            view.extras[_LOOP] = True  # the model's forward branches on the data: loop instead
    if view.extras.get(_LOOP):
        rows = [step(wanted, *(a[i] for a in args)) for i in range(input_ids.shape[0])]
        grads = {n: torch.stack([r[0][n] for r in rows]) for n in layout.names}
        loss = torch.stack([r[1] for r in rows])
    batch = input_ids.shape[0]
    dtype = next(iter(wanted.values())).dtype if wanted else torch.float32
    flat = torch.cat([grads[n].detach().reshape(batch, -1).to(dtype) for n in layout.names], dim=1) \
        if layout.names else torch.zeros(batch, 0, dtype=dtype)
    return flat, loss.detach().double().cpu(), target_mask.sum(dim=1).double().cpu()


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
