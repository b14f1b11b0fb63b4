"""Interventions on a forward pass, in the ModelView's vocabulary only: the residual stream
entering a block (``resid[l]``, as the core's artifact numbers it), a module's output (the
MLP's, via ``view.mlp_out``, read per token by ``edit_mlp``) and the per-head slices of the
attention output projection's input (``view.attn_out``: head h is columns h*d_head:(h+1)*d_head).

Each helper registers its hooks and returns their handle; ``hooked`` removes them all on exit,
also on error. The functions passed in receive the tensor and return its replacement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from tensorscope_core.plugin_api import ModelView

Edit = Callable[[torch.Tensor], torch.Tensor]
@contextmanager
def hooked(handles: Sequence[RemovableHandle | HookGroup]) -> Iterator[None]:
    """Keep ``handles`` for the block, remove them after it."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _edit_first_input(edit: Edit) -> Callable[..., Any]:
    """A with_kwargs pre-hook that replaces the module's main input (positional or hidden_states)."""
    def hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (edit(args[0]), *args[1:]), kwargs
        key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
        return args, {**kwargs, key: edit(kwargs[key])}
    return hook


def _edit_output(edit: Edit) -> Callable[..., Any]:
    def hook(module: Any, args: tuple, output: Any) -> Any:
        if isinstance(output, tuple):
            return (edit(output[0]), *output[1:])
        return edit(output)
    return hook


def edit_resid(view: ModelView, index: int, edit: Edit) -> RemovableHandle:
    """Edit ``resid[index]``: the input of block ``index``, or the last block's output for n_layers."""
    if index < view.n_layers:
        return view.blocks[index].register_forward_pre_hook(_edit_first_input(edit), with_kwargs=True)
    return view.blocks[-1].register_forward_hook(_edit_output(edit))


def edit_output(module: torch.nn.Module, edit: Edit) -> RemovableHandle:
    """Edit a module's (main) output."""
    return module.register_forward_hook(_edit_output(edit))


class HookGroup:
    """Several hooks that are installed and removed as one."""

    def __init__(self, *handles: RemovableHandle) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def edit_mlp(view: ModelView, layer: int, edit: Edit) -> RemovableHandle | HookGroup:
    """Edit the MLP's contribution at ``layer`` (the output of ``view.mlp_out[layer]``) as [batch, seq,
    d_model]: where the architecture runs its MLP on flattened tokens (OPT), a pre-hook on the block
    keeps the stream's shape so ``edit`` still sees positions."""
    if not view.mlp_tokens_flat:
        return edit_output(view.mlp_out[layer], edit)
    stream: dict[str, torch.Tensor] = {}

    def keep(module: Any, args: tuple, kwargs: dict) -> None:
        stream["in"] = args[0] if args else kwargs["hidden_states"]

    def per_token(x: torch.Tensor) -> torch.Tensor:
        return edit(view.mlp_tokens(x, stream["in"])).reshape(x.shape)

    return HookGroup(view.blocks[layer].register_forward_pre_hook(keep, with_kwargs=True),
                     edit_output(view.mlp_out[layer], per_token))


def edit_heads(view: ModelView, layer: int, edit: Edit) -> RemovableHandle:
    """Edit the head outputs entering the attention output projection of ``layer``.

    ``edit`` gets a [batch, seq, n_heads, d_head] view and returns a tensor of that shape.
    """
    if not view.attn_out:
        raise NotImplementedError(f"the {view.family} adapter does not map the attention output projection "
                                  "(ModelView.attn_out)")

    def per_head(z: torch.Tensor) -> torch.Tensor:
        shape = z.shape
        return edit(z.reshape(*shape[:-1], view.n_heads, view.d_head)).reshape(shape)

    return view.attn_out[layer].register_forward_pre_hook(_edit_first_input(per_head), with_kwargs=True)


def record(store: dict[Any, torch.Tensor], key: Any) -> Edit:
    """An edit that keeps a detached copy of the tensor under ``key`` and changes nothing."""
    def keep(x: torch.Tensor) -> torch.Tensor:
        store[key] = x.detach().clone()
        return x
    return keep


def head_attn_out_reason(view: ModelView) -> str | None:
    """Why head interventions do not apply to this view, or None."""
    if view.attn_out:
        return None
    return (f"the {view.family} adapter does not map the attention output projection (ModelView.attn_out); "
            "with the generic adapter pass attn_out='path.inside.block'")


def token_ce(logits: torch.Tensor, target_ids: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [batch, seq] as the core's token loss (float32 for half precision), 0 off target.

    Positions after the batch's last target (a causal model's final column) are not scored at
    all: under autograd the log-softmax over [batch, seq, vocab] is the largest saved tensor.
    (Reading the slice through a transposed view instead of a copy saves no memory and runs
    the log-softmax on strided data, at about twice the time.)
    """
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    scored = target_mask.any(dim=0).nonzero()
    if not len(scored):
        return logits[..., 0] * 0  # no targets: F = 0, still a function of the logits
    last = int(scored.max()) + 1
    ce = torch.nn.functional.cross_entropy(logits[:, :last].reshape(-1, logits.shape[-1]),
                                           target_ids[:, :last].reshape(-1), reduction="none")
    return torch.nn.functional.pad(ce.view(-1, last), (0, logits.shape[1] - last)) * target_mask


def logits_of(view: ModelView, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The model's logits for one batch (no cache)."""
    return view.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
