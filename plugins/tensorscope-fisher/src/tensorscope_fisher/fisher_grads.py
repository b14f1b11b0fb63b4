"""The ``fisher.per_example_grads`` artifact: per-example score vectors for the Fisher metrics.

Computed once per batch and shared by ``fisher.diagonal`` (and through it ``fisher.grouped``,
``fisher.masks``) and ``fisher.spectrum``.

**Per-example loss.** Example i (one sequence) with target positions t (the core's
``loss_targets``: next tokens of a causal model, the seeded masked positions of a masked-LM
encoder) and labels y has the loss

    l_i(theta; y) = sum_t m_it * CE(logits_it, y_t)       (the sum, not the mean, over targets)

i.e. minus the log-likelihood of the example's labels, each position's prediction made from
the observed context (teacher forcing). Two label sets give two gradients per example:

- ``true``: y_t ~ softmax(logits_t), drawn independently per target position from the
  model's own distribution (the "sampled backward" of the true Fisher). Because
  E_{y_t}[grad log p(y_t)] = 0 and positions are drawn independently given the context, the
  cross terms vanish in expectation: E[g_i g_i^T] = sum_t F_it, the sum of the positions'
  Fishers J_t^T (diag p_t - p_t p_t^T) J_t, which is the GGN of l_i (``fisher.lanczos``).
- ``empirical``: y the observed labels (``token_loss``'s targets); E[g_i g_i^T] is the
  empirical Fisher of the sequence and keeps its cross terms.

A Fisher metric averages g_i g_i^T (or its diagonal) over examples: Fisher information *per
example (sequence)*. Divide by the mean of ``n_targets`` for the Fisher per target token.

**Labels drawn from the model.** The draws use the shared forward's logits (the same
parameters) and a ``torch.Generator`` per example seeded by the run's seed, the batch's task
and index within its task and a CRC-32 of the example's tokens, so they do not depend on the
micro-batch size or the other tasks of the run. (Two identical sequences in one batch draw
the same labels: unbiased, only their two estimates are not independent.)

**Value.** A list ``[true, empirical, n_targets]`` (a list so micro-batches concatenate):
``true`` and ``empirical`` [batch, P] in the model's dtype, the trainable parameters
flattened and concatenated in ``named_parameters`` order (tied parameters once);
``n_targets`` [batch] float64. ``FisherGrads.of(view, value)`` unpacks it with its
``layout`` (name -> (slice, shape)). Consumers must not modify the tensors in place.
The gradients come from ``tensorscope_core.per_example.per_example_grads`` (torch.func
``vmap`` of a ``vjp`` on a hook-free copy of the model, a loop for BERT-style encoders).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import torch

from tensorscope_core import ArtifactSpec, ModelView
from tensorscope_core.artifacts import act_bytes
from tensorscope_core.capture import CaptureContext
from tensorscope_core.data import Batch
from tensorscope_core.per_example import per_example_grads

ARTIFACT = "fisher.per_example_grads"
_LAYOUT = "tensorscope_fisher.fisher_grads.layout"

Layout = dict[str, tuple[slice, tuple[int, ...]]]


def layout_of(view: ModelView) -> Layout:
    """Where each trainable parameter lies in the artifact's vectors: name -> (slice, shape)."""
    layout = view.extras.get(_LAYOUT)
    if layout is None:
        layout, offset = {}, 0
        for name, p in view.model.named_parameters():
            if p.requires_grad:
                layout[name] = (slice(offset, offset + p.numel()), tuple(p.shape))
                offset += p.numel()
        view.extras[_LAYOUT] = layout
    return layout


def layout_size(layout: Layout) -> int:
    return max((s.stop for s, _ in layout.values()), default=0)


@dataclass(frozen=True)
class FisherGrads:
    """One batch of the artifact: per-example score vectors with their layout."""

    layout: Layout
    true: torch.Tensor
    empirical: torch.Tensor
    n_targets: torch.Tensor

    @classmethod
    def of(cls, view: ModelView, value: Any) -> FisherGrads:
        true, empirical, n_targets = value
        return cls(layout_of(view), true, empirical, n_targets)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A vector [P] (or [..., P]) of this layout -> {parameter name: tensor of its shape}."""
        return {n: flat[..., s].reshape(*flat.shape[:-1], *shape) for n, (s, shape) in self.layout.items()}


def draw_labels(logits: torch.Tensor, batch: Batch, input_ids: torch.Tensor, seed: int) -> torch.Tensor:
    """y_t ~ softmax(logits_t) for every position, one seeded generator per example [batch, seq]."""
    task_code = zlib.crc32((batch.task or "").encode())
    probs = torch.softmax(logits.detach().double(), dim=-1).cpu()
    rows = []
    for i in range(input_ids.shape[0]):
        row_code = zlib.crc32(input_ids[i].cpu().numpy().tobytes())
        gen = torch.Generator().manual_seed(
            (seed * 1_000_003 + task_code * 7_919 + batch.index_in_task * 104_729 + row_code) % 2**63)
        rows.append(torch.multinomial(probs[i], 1, generator=gen)[:, 0])
    return torch.stack(rows).to(input_ids.device)


def _summed_losses(logits: torch.Tensor, sampled: torch.Tensor, observed: torch.Tensor,
                   target_mask: torch.Tensor) -> torch.Tensor:
    """One example's [loss with the drawn labels, loss with the observed labels], summed over targets."""
    weights = target_mask.to(logits.dtype)
    both = torch.stack([sampled, observed])
    ce = torch.nn.functional.cross_entropy(logits.expand(2, *logits.shape).transpose(1, 2), both, reduction="none")
    return (ce * weights).sum(dim=1)


def fisher_grads(view: ModelView, logits: torch.Tensor, batch: Batch, model_input: torch.Tensor,
                 target_ids: torch.Tensor, target_mask: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """The artifact's value for one (micro-)batch: ``[true, empirical, n_targets]``."""
    sampled = draw_labels(logits, batch, batch.input_ids, seed)
    (true, empirical), _ = per_example_grads(view, list(layout_of(view)), _summed_losses, model_input,
                                             batch.attention_mask, sampled, target_ids, target_mask)
    return [true, empirical, target_mask.sum(dim=1).double().cpu()]


def _derive(ctx: CaptureContext) -> None:
    assert ctx.batch is not None
    targets = ctx.store["_targets"]
    ctx.store[ARTIFACT] = fisher_grads(ctx.view, ctx.outputs.logits, ctx.batch, targets.model_input,
                                       targets.target_ids, targets.target_mask, ctx.seed)


def _bytes(view: ModelView, batch: int, seq: int) -> int:
    # two gradients per example, plus what the vmapped backward keeps (as a backward of the batch)
    return 2 * batch * layout_size(layout_of(view)) * view.dtype_bytes + act_bytes(view, batch, seq)


PER_EXAMPLE_GRADS = ArtifactSpec(
    ARTIFACT, "forward",
    "per-example gradients of each example's summed token NLL with labels drawn from the model (true Fisher) "
    "and observed labels (empirical): [true [batch, P], empirical [batch, P], n_targets [batch]]",
    _bytes, derive=_derive, requires=("token_loss",))
