"""Forwards that resume at a block, for metrics that run one forward per intervention, and forwards
that stop early, for metrics that run one only for what hooks capture on the way.

An intervention at block ``l`` (ablating one of its heads, patching the stream entering it) leaves
blocks ``0 .. l-1`` computing exactly what they computed on the clean forward of the same inputs. A
metric that runs hundreds of such forwards (every head of every layer) need not recompute them:
``recorded_blocks`` keeps each block's output of one clean forward, and inside ``resumed_at`` the
blocks before ``l`` return the recorded output of block ``l-1`` without computing anything, so the
model's own forward (its masks, position embeddings, final norm and head) goes on from block ``l``.
Over the layers of a model this halves the block compute of such a sweep.

The blocks' outputs are kept as the blocks returned them (a tensor, or a tuple whose first entry is
the stream), so the model's loop receives what it received on the clean forward. The skipped blocks
are replaced through their ``forward`` attribute, which also skips accelerate's per-block hooks:
offloaded weights of the skipped blocks are not loaded at all.

A forward run only to capture the inputs of some blocks (to call them alone after) need not compute
what comes after the last one it reads: inside ``stopped_before(module)`` the model's call ends where
``module`` would start, so the later blocks and the vocabulary-sized logits (at a 135M model's
vocabulary, as large as eight blocks' work per token, and often the forward's largest tensor) are
never made.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from .view import ModelView


class _Stopped(Exception):
    """Raised by ``stopped_before``'s pre-hook, caught where its block ends."""


@contextmanager
def stopped_before(module: nn.Module) -> Iterator[None]:
    """A forward of the model inside the block stops at ``module``'s input: the call raises there and
    the block ends quietly, so the statements after the call inside it do not run. Forward pre-hooks
    registered on ``module`` before entering the block still run first (torch runs them in order), so
    a hook that keeps ``module``'s own input sees it. Any other exception propagates."""
    def stop(*_: Any) -> None:
        raise _Stopped

    handle = module.register_forward_pre_hook(stop)
    try:
        yield
    except _Stopped:
        pass
    finally:
        handle.remove()


@contextmanager
def recorded_blocks(view: ModelView) -> Iterator[list[Any]]:
    """Keep each block's output of the forwards run inside the block: ``outputs[i]`` is block
    ``i``'s output of the latest one (None before any forward)."""
    outputs: list[Any] = [None] * view.n_layers

    def keeper(index: int) -> Any:
        def keep(module: Any, args: tuple, output: Any) -> None:
            outputs[index] = output
        return keep

    handles = [block.register_forward_hook(keeper(i)) for i, block in enumerate(view.blocks)]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def resumed_at(view: ModelView, layer: int, outputs: Sequence[Any]) -> Iterator[None]:
    """Forwards inside the block start computing at block ``layer``: blocks ``0 .. layer-1`` return
    ``outputs[layer - 1]`` (from ``recorded_blocks`` on the same inputs) unchanged. The caller
    answers for the inputs being those of the recorded forward; ``layer`` 0 changes nothing."""
    if not 0 <= layer <= view.n_layers:
        raise ValueError(f"layer {layer} is not a block of {view.name} (0..{view.n_layers})")
    if layer == 0:
        yield
        return
    recorded = outputs[layer - 1]
    if recorded is None:
        raise ValueError(f"block {layer - 1}'s output was not recorded: run a forward inside recorded_blocks first")

    def skipped(*args: Any, **kwargs: Any) -> Any:
        return recorded

    missing = object()
    saved = [(block, block.__dict__.get("forward", missing)) for block in view.blocks[:layer]]
    for block, _ in saved:
        block.forward = skipped
    try:
        yield
    finally:
        for block, forward in saved:
            if forward is missing:
                del block.forward
            else:
                block.forward = forward
