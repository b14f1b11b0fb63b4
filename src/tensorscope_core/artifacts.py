"""Artifacts: named data products of a pass, declared with their cost and how to capture them.

A metric asks for artifacts by name; the scheduler merges the requests of all metrics
so each pass runs once per batch. Plugins add artifacts through ``register_artifacts``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .models.view import ModelView

if TYPE_CHECKING:
    from .capture import CaptureContext

PassKind = Literal["weights", "forward", "backward"]
PASS_ORDER: tuple[PassKind, ...] = ("weights", "forward", "backward")
Combine = Literal["cat", "sum"]
BytesFn = Callable[[ModelView, int, int], int]


@dataclass(frozen=True)
class ArtifactSpec:
    """One artifact.

    ``nbytes(view, batch, seq)`` is what it holds for one batch. ``install`` puts hooks
    on the forward (run once per run); ``derive`` fills it after the forward (and the
    backward, for pass ``backward``). ``combine`` says how micro-batches join: ``cat``
    along the batch dimension, or ``sum`` (already normalised to the whole batch).
    """

    name: str
    pass_kind: PassKind
    doc: str
    nbytes: BytesFn
    install: Callable[[CaptureContext], None] | None = None
    derive: Callable[[CaptureContext], None] | None = None
    requires: tuple[str, ...] = ()
    combine: Combine = "cat"
    forward_kwargs: tuple[tuple[str, object], ...] = ()


def act_bytes(view: ModelView, batch: int, seq: int) -> int:
    """Rough bytes autograd keeps per forward for the backward (per token: a few d_model,
    the MLP hidden, and the attention matrix per head), used for the memory plan."""
    per_layer = batch * seq * (8 * view.d_model + 2 * view.d_mlp + 2 * view.n_heads * seq)
    logits = 3 * batch * seq * view.vocab_size
    return (view.n_layers * per_layer + logits) * view.dtype_bytes
