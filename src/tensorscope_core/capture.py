"""Capture: hooks that fill artifacts during the shared forward/backward, scoped to a run."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .artifacts import ArtifactSpec
from .data import Batch
from .models.view import ModelView

if TYPE_CHECKING:
    from .core_artifacts import LossTargets


@dataclass
class CaptureContext:
    """What artifact producers see: the model view, the current micro-batch, and the store.

    ``store`` is emptied before every micro-batch; producers write tensors into it.
    ``targets`` are the run's loss targets of the current micro-batch (what the shared
    forward saw and predicts). ``batch_tokens`` is the number of loss tokens in the whole
    batch, so a loss summed over micro-batches equals the mean over the batch.
    """

    view: ModelView
    wanted: frozenset[str]
    seed: int
    store: dict[str, Any] = field(default_factory=dict)
    batch: Batch | None = None
    targets: LossTargets | None = None
    model_input: torch.Tensor | None = None
    outputs: Any = None
    batch_tokens: int = 0
    grad_enabled: bool = False
    #: the merged request of each parameterised artifact of the pass (``ArtifactSpec.merge``)
    requests: dict[str, Any] = field(default_factory=dict)
    #: gradients of the weights a dispatched model loads only while their module runs (offloaded ones),
    #: by parameter name, summed over the batch's micro-batches (``param_grad`` on dispatched models)
    loaded_grads: dict[str, torch.Tensor] = field(default_factory=dict)
    #: what a producer sums over the batch's micro-batches itself, by its own key (cleared with ``loaded_grads``
    #: at each batch): one running sum, not one tensor per micro-batch until they are joined
    batch_sums: dict[Any, torch.Tensor] = field(default_factory=dict)
    _handles: list[RemovableHandle] = field(default_factory=list)
    _undo: list[Callable[[], None]] = field(default_factory=list)

    def request(self, name: str) -> Any:
        """What the pass's consumers asked of artifact ``name``, merged (empty when none asked)."""
        return self.requests.get(name, {})

    def forward_hook(self, module: nn.Module, fn: Any, *, pre: bool = False) -> None:
        """Register a hook for the run (removed when the run's capture scope exits)."""
        if pre:
            handle = module.register_forward_pre_hook(fn, with_kwargs=True)
        else:
            handle = module.register_forward_hook(fn, with_kwargs=True)
        self._handles.append(handle)

    def keep(self, name: str, index: int, tensor: torch.Tensor, n: int) -> None:
        """Store ``tensor`` as element ``index`` of the per-layer list artifact ``name``."""
        slot = self.store.setdefault(name, [None] * n)
        slot[index] = tensor.detach()

    def on_exit(self, undo: Callable[[], None]) -> None:
        """Run ``undo`` when the run's capture scope exits (for changes that are not torch hooks)."""
        self._undo.append(undo)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        while self._undo:
            self._undo.pop()()
        self.loaded_grads.clear()


@contextmanager
def capture_scope(view: ModelView, specs: Sequence[ArtifactSpec], seed: int,
                  requests: dict[str, Any] | None = None) -> Iterator[CaptureContext]:
    """Install every wanted artifact's hooks once; remove them on exit, also on error."""
    ctx = CaptureContext(view=view, wanted=frozenset(s.name for s in specs), seed=seed, requests=dict(requests or {}))
    try:
        for spec in specs:
            if spec.install is not None:
                spec.install(ctx)
        yield ctx
    finally:
        ctx.remove_hooks()


@contextmanager
def embedding_output(view: ModelView) -> Iterator[list[torch.Tensor]]:
    """The token embedding's outputs of the forwards made in the block (where a backward can stop)."""
    outputs: list[torch.Tensor] = []
    handle = view.embed.register_forward_hook(lambda module, args, output: outputs.append(first_tensor(output)))
    try:
        yield outputs
    finally:
        handle.remove()


def backpropagate(loss: torch.Tensor, embedded: Sequence[torch.Tensor], into_weights: bool) -> None:
    """The shared backward. It goes into the weights only when a metric reads their gradients; else
    it stops at the token embedding's output, so no weight gradient (as large as the model, and a third
    of the backward's work) is made: what activation and attention gradients the artifacts hook are
    computed all the same, since they lie between the loss and that output."""
    start = embedded[-1] if embedded else None
    if into_weights or start is None or not start.requires_grad:
        loss.backward()
        return
    torch.autograd.backward(loss, inputs=[start])
    start.grad = None


def first_tensor(output: Any) -> torch.Tensor:
    """A module's main output: the tensor itself or the first element of a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def detach_all(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, list):
        return [detach_all(v) for v in value]
    if isinstance(value, dict):
        return {k: detach_all(v) for k, v in value.items()}
    return value


def combine_micro(parts: list[Any]) -> Any:
    """Join one artifact's micro-batch values along the batch dimension."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=0)
    if isinstance(first, list):
        return [combine_micro([p[i] for p in parts]) for i in range(len(first))]
    if callable(getattr(type(first), "cat", None)):  # a value type that joins its own micro-batches
        return type(first).cat(parts)
    raise TypeError(f"cannot concatenate artifact values of type {type(first).__name__}")


def tensor_bytes(value: Any) -> int:
    """Bytes of all tensors in a (nested) value: what an artifact or a metric state holds."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    if hasattr(value, "__dict__") and not isinstance(value, (nn.Module, type)):
        return sum(tensor_bytes(v) for k, v in vars(value).items() if not k.startswith("_ts_"))
    return 0
