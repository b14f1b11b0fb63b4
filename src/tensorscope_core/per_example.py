"""Per-example gradients of per-example losses, for plugins that need one gradient per example.

The shared backward gives the gradient of the batch loss only. Metrics that need one
gradient per example (gradient conflicts, TracIn, Fisher information) get them here:
``vmap`` over the rows of a batch of a ``vjp`` through ``functional_call`` of the model.

- **Hook-free copy.** The forwards run on ``tensorscope_core.functional.hook_free_copy``, a
  shallow copy of the module tree without hooks that shares every parameter and buffer
  tensor, so the capture hooks of the shared run never see these extra forwards and no
  memory is copied.
- **Dispatched models.** On a model accelerate spread over devices or offloaded, the forwards run
  through ``functional.OneDeviceModel``: the copy also drops accelerate's forward wrappers and every
  weight is loaded onto the device the inputs go to (``offloaded_bytes`` of them beyond what stays
  resident), since ``functional_call`` is given every tensor and nothing moves activations between
  devices.
- **Several losses per example.** ``loss`` returns a vector of losses for one example;
  each gets its own gradient from one forward (a ``vjp`` pulled back once per loss), e.g. the
  loss with the observed labels and with labels drawn from the model.
- **Loop fallback.** Models whose forward branches on the data under ``vmap``
  (transformers' bidirectional mask for BERT-style encoders) fall back to a loop of
  single-example calls with the same numbers; the fallback is remembered per model.

Half-precision logits are cast to float32 before ``loss`` sees them (as the core's token
loss does). The gradients come back flattened, one [batch, P] tensor per loss, the
parameters concatenated in the order of ``names`` in the parameters' dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.func import vjp, vmap

from .functional import OneDeviceModel
from .models.view import ModelView

#: loss(logits [seq, vocab] of one example, *that example's rows of the extra tensors) -> losses [n_losses]
ExampleLoss = Callable[..., torch.Tensor]

_LOOP = "tensorscope_core.per_example.loop"


def per_example_calls(view: ModelView, rows: int) -> int:
    """The calls of the model ``per_example_grads`` makes for ``rows`` examples: one vmapped call,
    or one per example for bidirectional encoders, whose attention mask (transformers'
    ``create_bidirectional_mask``) branches on the data, which ``vmap`` refuses. A causal model
    whose forward also branches is found on its first call (that call counts too) and loops after."""
    return rows if view.extras.get(_LOOP) or not view.causal else 1


def per_example_grads(view: ModelView, names: Sequence[str], loss: ExampleLoss, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, *rows: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-example gradients of the losses ``loss`` gives, w.r.t. the parameters ``names``.

    Row i of ``input_ids``, ``attention_mask`` and each tensor of ``rows`` is example i;
    ``loss(logits_i, *rows_i)`` returns that example's losses [n_losses]. Returns the
    gradients, one [batch, P] tensor per loss (P the total size of ``names``, concatenated
    in that order), and the losses [batch, n_losses] in float64 on the CPU.
    """
    parts, values = per_example_grad_parts(view, names, loss, input_ids, attention_mask, *rows)
    batch = input_ids.shape[0]
    dtype = next(iter(parts[0].values())).dtype if names and parts else torch.float32
    flat = [torch.cat([g[n].reshape(batch, -1).to(dtype) for n in names], dim=1) if names
            else torch.zeros(batch, 0, dtype=dtype, device=input_ids.device) for g in parts]
    return flat, values


def per_example_grad_parts(view: ModelView, names: Sequence[str], loss: ExampleLoss, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor,
                           *rows: torch.Tensor) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """``per_example_grads`` before its concatenation: per loss, {name: [batch, *shape]} (detached), for a
    consumer that reduces them parameter by parameter (a sketch) and never needs the [batch, P] copy."""
    model = OneDeviceModel(view, names)
    wanted = {n: model.weights[n] for n in names}

    def one(w: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor,
            *extra: torch.Tensor) -> tuple[tuple[dict[str, torch.Tensor], ...], torch.Tensor]:
        def losses_of(w: dict[str, torch.Tensor]) -> torch.Tensor:
            out = model(w, input_ids=ids[None], attention_mask=mask[None], use_cache=False)
            logits = out.logits[0]
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            return loss(logits, *extra).reshape(-1)

        values, pullback = vjp(losses_of, w)[:2]
        basis = torch.eye(values.shape[0], dtype=values.dtype, device=values.device)
        return tuple(pullback(basis[i])[0] for i in range(values.shape[0])), values.detach()

    args = (input_ids, attention_mask, *rows)
    grads: tuple[dict[str, torch.Tensor], ...]
    if not view.causal:
        view.extras[_LOOP] = True  # bidirectional masks branch on the data (see per_example_calls)
    if not view.extras.get(_LOOP):
        try:
            grads, values = vmap(one, in_dims=(None,) + (0,) * len(args))(wanted, *args)
        except RuntimeError as exc:
            if "vmap" not in str(exc):
                raise
            view.extras[_LOOP] = True  # the model's forward branches on the data: loop instead
    if view.extras.get(_LOOP):
        out = [one(wanted, *(a[i] for a in args)) for i in range(input_ids.shape[0])]
        grads = tuple({n: torch.stack([r[0][k][n] for r in out]) for n in names} for k in range(len(out[0][0])))
        values = torch.stack([r[1] for r in out])
    return [{n: g[n].detach() for n in names} for g in grads], values.detach().double().cpu()
