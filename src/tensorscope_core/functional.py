"""The model's loss at parameters other than its own, for metrics that perturb, merge or prune.

Loss landscapes, sharpness, pruning curves and merged models all ask one question: what is
the run's token loss on this batch if the weights were ``theta'``? They must not write into
the model (other metrics of the same pass read it) nor trigger the run's capture hooks
(which would overwrite the shared artifacts). ``batch_loss`` answers it through
``torch.func.functional_call`` on a hook-free shallow copy of the model that shares every
parameter and buffer tensor, so no weights are copied; parameters not given keep their
values, tied parameters stay tied, and the result is differentiable with respect to the
tensors passed in (for gradients, Hessian-vector products and fitted paths).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .core_artifacts import LossTargets
from .data import Batch
from .models.view import ModelView

_COPY_KEY = "tensorscope_core.functional.hook_free_copy"
_VIEW_KEY = "tensorscope_core.functional.hook_free_view"
_BARE_KEY = "tensorscope_core.functional.undispatched_copy"
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_hooks",
               "_backward_pre_hooks")


def hook_free_copy(view: ModelView) -> nn.Module:
    """A copy of ``view.model``'s module tree without hooks, sharing every parameter and buffer.

    Built once per view (kept in ``view.extras``); the capture hooks of a run never fire on it.
    """
    shadow = view.extras.get(_COPY_KEY)
    if shadow is None:
        model = view.model
        memo: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
        shadow = copy.deepcopy(model, memo)
        for module in shadow.modules():
            for attr in _HOOK_DICTS:
                hooks = getattr(module, attr, None)
                if hooks is not None:
                    setattr(module, attr, type(hooks)())
        view.extras[_COPY_KEY] = shadow
    return shadow


def undispatched_copy(view: ModelView) -> nn.Module:
    """``hook_free_copy(view)``, and for a dispatched model a further copy without accelerate's forward
    wrappers (which load offloaded weights and move activations between devices), for callers that
    pass every parameter and buffer themselves (``functional_call``) on one device. Built once per view."""
    if view.device_map is None:
        return hook_free_copy(view)
    bare = view.extras.get(_BARE_KEY)
    if bare is None:
        shadow = hook_free_copy(view)
        memo: dict[int, Any] = {id(t): t for t in itertools.chain(shadow.parameters(), shadow.buffers())}
        bare = copy.deepcopy(shadow, memo)
        for module in bare.modules():
            if hasattr(module, "_hf_hook"):
                for attr in ("_hf_hook", "_old_forward", "forward"):
                    module.__dict__.pop(attr, None)
        view.extras[_BARE_KEY] = bare
    return bare


def offloaded_bytes(view: ModelView) -> int:
    """Bytes ``OneDeviceModel`` loads on a dispatched model: every parameter not on the input device
    (offloaded ones, or ones another device holds); 0 for a plain model."""
    if view.device_map is None:
        return 0
    if view.planned_dispatch:  # built from a config: where its map puts each one
        main = view.main_placement()
        return view.memoised("offloaded_bytes", lambda: sum(
            p.numel() * p.element_size() for n, p in view.named_parameters() if view.placement(n) != main))
    device = view.input_device
    return view.memoised("offloaded_bytes", lambda: sum(
        p.numel() * p.element_size() for _, p in view.named_parameters() if p.is_meta or p.device != device))


class OneDeviceModel:
    """The model as a function of the tensors a caller differentiates, on one device, for metrics that
    make their own gradients or products through the weights (per-example gradients, curvature).

    It calls ``undispatched_copy(view)`` through ``functional_call`` with the tensors given and every other
    parameter and buffer. For a plain model those are the model's own. For a dispatched model every
    parameter is loaded onto the device its inputs go to (the offloaded ones from their offload folder:
    ``offloaded_bytes``, which this holds), since the copy runs without accelerate's hooks, which would
    load them and move activations between devices; and the duplicate of a tied weight, which the copy
    holds as a tensor of its own (accelerate unties it), gets its twin's value.
    """

    def __init__(self, view: ModelView, wanted: Iterable[str]) -> None:
        self.module = undispatched_copy(view)
        dispatched = view.device_map is not None
        params = {name: tensor.to(view.input_device) for name, tensor in view.named_weights()} if dispatched \
            else dict(view.named_parameters())
        names = set(wanted)
        #: the tensors a caller differentiates, by name, detached (what it passes back, or replaces)
        self.weights = {n: params[n].detach() for n in params if n in names}
        self.fixed = {n: p.detach() for n, p in params.items() if n not in names}
        self.fixed.update({n: b.detach().to(view.input_device) if dispatched else b.detach()
                           for n, b in view.model.named_buffers()})
        self.ties = dict(view.tied_duplicates or {}) if dispatched else {}
        self.fixed.update({dup: self.fixed[name] for dup, name in self.ties.items() if name in self.fixed})
        self._name_of = {id(m): name for name, m in view.model.named_modules()}
        self._source = view
        self._view: ModelView | None = None

    @property
    def view(self) -> ModelView:
        """The view of the copy this runs (its embedding, blocks, attention, MLP modules ...): hooks and
        ``recorded_blocks`` / ``resumed_at`` on it act on the forwards of ``self(...)``."""
        if self._view is None:
            self._view = _view_of_copy(self._source, self.module)
        return self._view

    def call_part(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """``module``'s twin in the copy called on its own (a block, for its Jacobian) with its parameters and
        buffers from ``weights`` and the fixed ones: a dispatched model's loaded, as in a whole call."""
        name = self._name_of[id(module)]
        prefix = f"{name}." if name else ""
        tensors = {k[len(prefix):]: v for k, v in {**self.fixed, **self.weights}.items() if k.startswith(prefix)}
        return functional_call(self.module.get_submodule(name), tensors, args=args, kwargs=kwargs)

    def __call__(self, weights: Mapping[str, torch.Tensor], **inputs: Any) -> Any:
        """The model's output on ``inputs`` (keyword arguments of its forward) at ``weights`` (names of
        ``self.weights``), the rest fixed."""
        tied = {dup: weights[name] for dup, name in self.ties.items() if name in weights}
        return functional_call(self.module, ({**weights, **tied}, self.fixed), args=(), kwargs=inputs)


def hook_free_view(view: ModelView) -> ModelView:
    """The view of ``hook_free_copy(view)``: the same parameters and buffers, none of the run's
    capture hooks, every mapped part (blocks, attention, MLP and attention output modules, final
    norm, unembedding) replaced by its twin in the copy.

    Forwards of a metric's own during the shared pass (inside ``update``) run on it, so the
    capture hooks never see them. Built once per view.
    """
    twin_view: ModelView | None = view.extras.get(_VIEW_KEY)
    if twin_view is None:
        twin_view = _view_of_copy(view, hook_free_copy(view))
        view.extras[_VIEW_KEY] = twin_view
    return twin_view


def _view_of_copy(view: ModelView, copy_: nn.Module) -> ModelView:
    """``view`` with its model and every mapped part replaced by their twins in ``copy_`` (a deep copy)."""
    name_of = {id(module): name for name, module in view.model.named_modules()}
    modules = dict(copy_.named_modules())

    def twin(module: Any) -> Any:
        return None if module is None else modules[name_of[id(module)]]

    return dataclasses.replace(
        view, model=copy_, embed=twin(view.embed), blocks=[twin(m) for m in view.blocks],
        attn=[twin(m) for m in view.attn], mlp_out=[twin(m) for m in view.mlp_out],
        attn_out=[twin(m) for m in view.attn_out], final_norm=twin(view.final_norm),
        unembed=twin(view.unembed), extras={})


def trainable_model(view: ModelView) -> OneDeviceModel:
    """``OneDeviceModel`` of the trainable parameters: what a metric that perturbs every weight passes to
    ``batch_loss`` so that it also runs on a dispatched model (its ``weights`` are the point to perturb,
    loaded onto the input device: ``offloaded_bytes``, which the metric declares while it holds them)."""
    return OneDeviceModel(view, [n for n, p in view.named_parameters() if p.requires_grad])


def batch_logits(view: ModelView, batch: Batch, targets: LossTargets,
                 params: Mapping[str, torch.Tensor] | None = None,
                 model: OneDeviceModel | None = None) -> torch.Tensor:
    """Logits [batch, seq, vocab] of the run's input for ``batch`` (``targets.model_input``: masked
    positions replaced for masked LMs), with ``params`` replacing the model's parameters of those
    names (None: the model's own weights). Half-precision logits come back as float32.

    ``targets`` is ``tensorscope_core.core_artifacts.loss_targets(view, batch, seed)``, the run's
    own inputs and targets for the batch (the same masked-LM masks). With ``model`` (a ``OneDeviceModel``
    of the view, e.g. ``trainable_model``) the forward runs on it, ``params`` replacing some of its
    ``weights``: on a dispatched model, where the hook-free copy has no weights of its own to fall back on.
    """
    inputs = {"input_ids": targets.model_input, "attention_mask": batch.attention_mask, "use_cache": False}
    if model is not None:
        out = model({**model.weights, **(params or {})}, **inputs)
    else:
        out = functional_call(hook_free_copy(view), dict(params or {}), args=(), kwargs=inputs, strict=False)
    logits: torch.Tensor = out.logits
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits  # as the core's token loss


def batch_loss(view: ModelView, batch: Batch, targets: LossTargets,
               params: Mapping[str, torch.Tensor] | None = None,
               model: OneDeviceModel | None = None) -> torch.Tensor:
    """Mean token cross-entropy of ``batch`` over its targets at the weights ``batch_logits`` uses.

    This is the loss the core's backward differentiates (``token_loss.sum() / n_targets``),
    so at the model's own weights it equals the run's loss on that batch.
    """
    logits = batch_logits(view, batch, targets, params, model)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.target_ids.reshape(-1),
                                           reduction="none")
    weights = targets.target_mask.reshape(-1).to(ce.dtype)
    return (ce * weights).sum() / weights.sum().clamp(min=1)


__all__ = ["batch_logits", "batch_loss", "hook_free_copy", "trainable_model"]
