"""Artifacts: named data products of a pass, declared with their cost and how to capture them.

A metric asks for artifacts by name; the scheduler merges the requests of all metrics
so each pass runs once per batch. Plugins add artifacts through ``register_artifacts``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .models.activations import block_saved_bytes, second_order_ratio
from .models.view import ModelView

if TYPE_CHECKING:
    from .capture import CaptureContext

#: ``data``: the batches only (no model call: for metrics that make their own passes over them)
PassKind = Literal["weights", "data", "forward", "backward"]
PASS_ORDER: tuple[PassKind, ...] = ("weights", "data", "forward", "backward")
Combine = Literal["cat", "sum"]
#: the core artifact of parameter gradients: only a pass that asks it backpropagates into the weights
PARAM_GRAD = "param_grad"
BytesFn = Callable[[ModelView, int, int], int]
#: what one consumer asks of a parameterised artifact (layers, modules, parameter names, label kinds)
Request = Mapping[str, Any]


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
    own_passes: Callable[[ModelView, int, int, Request], dict[str, int]] | None = None
    merge: Callable[[Sequence[Request]], Request] | None = None
    request_nbytes: Callable[[ModelView, int, int, Request], int] | None = None
    #: bytes the producer holds only while it derives one micro-batch (``view, rows, seq, request``):
    #: the activations of a backward of its own, captured inputs; the plan adds them to the pass's
    #: peak, and they are not part of the value the run measures
    transient_nbytes: Callable[[ModelView, int, int, Request], int] | None = None

    def transient_for(self, view: ModelView, rows: int, seq: int, request: Request) -> int:
        """Bytes the producer holds while deriving one micro-batch of ``rows`` (0 when undeclared)."""
        return 0 if self.transient_nbytes is None else self.transient_nbytes(view, rows, seq, request)

    def bytes_for(self, view: ModelView, batch: int, seq: int, request: Request) -> int:
        """Bytes of one batch of the artifact's value under the (merged) ``request``."""
        if self.request_nbytes is not None:
            return self.request_nbytes(view, batch, seq, request)
        return self.nbytes(view, batch, seq)


def act_bytes(view: ModelView, batch: int, seq: int) -> int:
    """Bytes autograd keeps per forward for the backward, used for the memory plan: what each block
    saves (measured per architecture, ``models.activations``) and, per token, the final norm and the
    output head's input (at most 6 d_model: BERT's prediction head) and the logits, their log-softmax and
    their gradient."""
    per_token = 6 * view.d_model + 3 * view.vocab_size
    return view.n_layers * block_saved_bytes(view, batch, seq) + batch * seq * per_token * view.dtype_bytes


def kept_graph_bytes(view: ModelView, batch: int, seq: int, blocks: int | None = None) -> int:
    """Bytes a loss's first-order graph holds when it is kept for second-order products (the gradient made
    with ``create_graph=True``, differentiated again per product): per block ``second_order_ratio`` times
    what the block saves for one backward, and per token the final norm's and head's 10 d_model and the
    logits, their log-softmax and their gradient, in float32 at least (plus the model-dtype logits of a
    16-bit model). ``blocks``: the last this many blocks are in the graph (the gradient is of their
    parameters only, and nothing before them requires grad); None: all."""
    per_vocab = 3 * max(view.dtype_bytes, 4) + (view.dtype_bytes if view.dtype_bytes < 4 else 0)
    per_token = 10 * view.d_model * view.dtype_bytes + per_vocab * view.vocab_size
    in_graph = view.n_layers if blocks is None else blocks
    return int(in_graph * block_saved_bytes(view, batch, seq) * second_order_ratio(view)) + batch * seq * per_token


def forward_act_bytes(view: ModelView, batch: int, seq: int, *, loss: bool = True) -> int:
    """Bytes a forward without autograd holds at its peak: one block's working tensors at a time (at most
    what the block would save for a backward), then the logits and (``loss``) their log-softmax; with a
    49,152-word vocabulary, mostly the logits."""
    logits = (2 if loss else 1) * batch * seq * view.vocab_size * view.dtype_bytes
    return block_saved_bytes(view, batch, seq) + logits
