"""The artifacts the core itself provides (registered by the core's built-in plugin).

Names: ``weights``; forward: ``logits``, ``token_loss``, ``resid``, ``mlp_hidden``,
``attn_pattern``; backward: ``param_grad``, ``resid_grad``. ``resid`` has n_layers + 1
entries: entry l is the residual stream entering block l, the last one leaves the
final block (before the final norm).
"""

from __future__ import annotations

import functools
import weakref
import zlib
from dataclasses import dataclass
from typing import Any

import torch

from .artifacts import ArtifactSpec, act_bytes
from .capture import CaptureContext, first_tensor
from .data import Batch
from .models.view import ModelView

MLM_MASK_FRACTION = 0.15


@dataclass
class LossTargets:
    """What the shared forward sees and what its token loss predicts.

    Causal models: the input is the batch and position t predicts token t+1.
    Masked-LM encoders: a seeded 15% of real tokens (at least one per sequence) are
    replaced by the mask token and predicted; every metric sees that same input. The
    seed combines the run's seed, the task and the batch's index within its task.
    """

    model_input: torch.Tensor
    target_ids: torch.Tensor
    target_mask: torch.Tensor

    @property
    def n_targets(self) -> int:
        return int(self.target_mask.sum())

    def slice(self, start: int, stop: int) -> LossTargets:
        return LossTargets(self.model_input[start:stop], self.target_ids[start:stop], self.target_mask[start:stop])


def loss_targets(view: ModelView, batch: Batch, seed: int) -> LossTargets:
    ids, mask = batch.input_ids, batch.attention_mask
    if view.causal:
        target_ids = torch.zeros_like(ids)
        target_ids[:, :-1] = ids[:, 1:]
        target_mask = torch.zeros_like(mask)
        target_mask[:, :-1] = mask[:, 1:]
        return LossTargets(ids, target_ids, target_mask)
    if view.mask_token_id is None:
        return LossTargets(ids, ids, torch.zeros_like(mask))
    # Seeded by the task and the batch's place within it, so a task's mask (and loss) does
    # not depend on which other tasks share the run.
    task_code = zlib.crc32((batch.task or "").encode())
    gen = torch.Generator().manual_seed((seed * 1_000_003 + task_code * 7_919 + batch.index_in_task) % 2**63)
    chosen = (torch.rand(ids.shape, generator=gen) < MLM_MASK_FRACTION) & mask.bool()
    for row in range(ids.shape[0]):
        if not chosen[row].any() and mask[row].any():
            real = mask[row].nonzero().flatten()
            chosen[row, real[torch.randint(len(real), (1,), generator=gen)]] = True
    model_input = ids.masked_fill(chosen, view.mask_token_id)
    return LossTargets(model_input, ids, chosen.long())


def _install_resid(ctx: CaptureContext) -> None:
    n = ctx.view.n_layers + 1

    def pre_first(module: Any, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        ctx.keep("resid", 0, hidden, n)
        if "resid_grad" in ctx.wanted and ctx.grad_enabled and hidden.requires_grad:
            hidden.register_hook(lambda g: _keep_grad(ctx, 0, g, n))

    ctx.forward_hook(ctx.view.blocks[0], pre_first, pre=True)
    for layer, block in enumerate(ctx.view.blocks):
        def post(module: Any, args: tuple, kwargs: dict, output: Any, layer: int = layer) -> None:
            hidden = first_tensor(output)
            ctx.keep("resid", layer + 1, hidden, n)
            if "resid_grad" in ctx.wanted and ctx.grad_enabled and hidden.requires_grad:
                hidden.register_hook(lambda g: _keep_grad(ctx, layer + 1, g, n))
        ctx.forward_hook(block, post)


def _keep_grad(ctx: CaptureContext, index: int, grad: torch.Tensor, n: int) -> None:
    slot = ctx.store.setdefault("resid_grad", [None] * n)
    slot[index] = grad.detach()


def _install_mlp_hidden(ctx: CaptureContext) -> None:
    n = ctx.view.n_layers
    stream: dict[str, torch.Tensor] = {}  # the residual stream entering the model: [batch, seq, d]
    if ctx.view.mlp_tokens_flat:
        def pre_first(module: Any, args: tuple, kwargs: dict) -> None:
            stream["in"] = args[0] if args else kwargs["hidden_states"]
        ctx.forward_hook(ctx.view.blocks[0], pre_first, pre=True)
    for layer, module in enumerate(ctx.view.mlp_out):
        def pre(module: Any, args: tuple, kwargs: dict, layer: int = layer) -> None:
            hidden = (args[0] if args else next(iter(kwargs.values()))).detach()
            if ctx.view.mlp_tokens_flat:
                hidden = ctx.view.mlp_tokens(hidden, stream["in"])
            ctx.keep("mlp_hidden", layer, hidden, n)
        ctx.forward_hook(module, pre, pre=True)


def _derive_logits(ctx: CaptureContext) -> None:
    ctx.store["logits"] = ctx.outputs.logits


def _derive_token_loss(ctx: CaptureContext) -> None:
    targets = ctx.targets
    assert targets is not None, "the runner sets the micro-batch's targets before the forward"
    logits = ctx.outputs.logits
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # half-precision log-softmax loses the small probabilities
    flat = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.target_ids.reshape(-1), reduction="none")
    ctx.store["token_loss"] = flat.view(targets.target_ids.shape) * targets.target_mask
    ctx.store["target_mask"] = targets.target_mask


def _derive_attn(ctx: CaptureContext) -> None:
    attentions = getattr(ctx.outputs, "attentions", None)
    if not attentions or attentions[0] is None:
        raise RuntimeError(f"{ctx.view.name} returned no attention weights: load it with attn_implementation='eager'")
    ctx.store["attn_pattern"] = [a.detach() for a in attentions]


_HOOKED = "_tensorscope_grad_hooked"


def _install_param_grad(ctx: CaptureContext) -> None:
    """On a dispatched model an offloaded weight is a meta tensor: accelerate's hook loads a fresh tensor
    for each call of its module, and the backward's gradient goes to that one. So each loaded weight of the
    shared forward gets a gradient hook adding into ``ctx.loaded_grads`` under the parameter's name (a tied
    duplicate's under its twin's), once per tensor however many modules use it. Nothing on a plain model."""
    view = ctx.view
    if view.device_map is None:
        return
    tied = view.tied_duplicates or {}
    own = weakref.ref(ctx)
    for prefix, module in view.model.named_modules():
        hook = getattr(module, "_hf_hook", None)
        names = [n for n, p in module.named_parameters(recurse=False) if p.is_meta]
        if hook is None or not names:
            continue

        def pre_forward(target: Any, *args: Any, _module: Any = module, _prefix: str = prefix,
                        _names: list[str] = names, _load: Any = hook.pre_forward, **kwargs: Any) -> Any:
            loaded = _load(target, *args, **kwargs)
            run = own()
            if run is not None and target is _module and run.grad_enabled and torch.is_grad_enabled():
                for name in _names:
                    weight = getattr(target, name)
                    if weight.requires_grad and not getattr(weight, _HOOKED, False):
                        setattr(weight, _HOOKED, True)  # a tied weight loaded once serves two modules
                        full = f"{_prefix}.{name}" if _prefix else name
                        weight.register_hook(functools.partial(_add_loaded_grad, own, tied.get(full, full)))
            return loaded

        hook.pre_forward = pre_forward  # an instance attribute over the class's method, removed on exit
        ctx.on_exit(functools.partial(hook.__dict__.pop, "pre_forward", None))


def _add_loaded_grad(own: weakref.ref[CaptureContext], name: str, grad: torch.Tensor) -> None:
    run = own()
    if run is not None:
        held = run.loaded_grads.get(name)
        run.loaded_grads[name] = grad.detach().clone() if held is None else held + grad.detach()


def _derive_param_grad(ctx: CaptureContext) -> None:
    # The .grad tensors themselves (no copy): the runner clears them after every metric has read them.
    # A dispatched model's offloaded weights have theirs in ``loaded_grads`` (``_install_param_grad``).
    loaded, ctx.loaded_grads = ctx.loaded_grads, {}
    grads = {}
    for name, p in ctx.view.named_parameters():
        grad = p.grad if p.grad is not None else loaded.get(name)
        if grad is not None:
            grads[name] = grad.detach()
    ctx.store["param_grad"] = grads


def _resid_bytes(view: ModelView, batch: int, seq: int) -> int:
    return (view.n_layers + 1) * batch * seq * view.d_model * view.dtype_bytes


CORE_ARTIFACTS: tuple[ArtifactSpec, ...] = (
    ArtifactSpec("weights", "weights", "the model's parameters (no data)", lambda v, b, s: 0),
    ArtifactSpec("batches", "data", "the run's batches and their loss targets only (Step.batch, Step.targets), "
                 "with no shared forward: for metrics that make their own passes over them", lambda v, b, s: 0),
    ArtifactSpec("logits", "forward", "output logits [batch, seq, vocab]",
                 lambda v, b, s: b * s * v.vocab_size * v.dtype_bytes, derive=_derive_logits),
    ArtifactSpec("token_loss", "forward",
                 "per-token cross-entropy [batch, seq] (0 where not a target) and target_mask",
                 lambda v, b, s: b * s * max(4, v.dtype_bytes), derive=_derive_token_loss),
    ArtifactSpec("resid", "forward", "residual stream, n_layers+1 tensors [batch, seq, d_model]",
                 _resid_bytes, install=_install_resid),
    ArtifactSpec("mlp_hidden", "forward", "MLP hidden units (input of the MLP output projection) per layer",
                 lambda v, b, s: v.n_layers * b * s * v.d_mlp * v.dtype_bytes, install=_install_mlp_hidden),
    ArtifactSpec("attn_pattern", "forward", "attention probabilities per layer [batch, heads, seq, seq]",
                 lambda v, b, s: v.n_layers * b * v.n_heads * s * s * v.dtype_bytes, derive=_derive_attn,
                 forward_kwargs=(("output_attentions", True),)),
    ArtifactSpec("param_grad", "backward", "gradient of the batch-mean token loss per parameter",
                 lambda v, b, s: v.every_param_bytes, install=_install_param_grad, derive=_derive_param_grad,
                 requires=("token_loss",),
                 combine="sum"),
    ArtifactSpec("resid_grad", "backward", "gradient of the batch-mean loss w.r.t. each resid entry",
                 _resid_bytes, requires=("token_loss", "resid")),
)

__all__ = ["CORE_ARTIFACTS", "LossTargets", "act_bytes", "loss_targets"]
