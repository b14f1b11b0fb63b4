"""The Fisher metrics' view of the core's ``per_example_grads`` artifact: per-example score vectors.

``fisher.diagonal`` (and through it ``fisher.grouped``, ``fisher.masks``) and ``fisher.spectrum``
ask the core's shared ``per_example_grads`` artifact for every trainable parameter with the label
sets of the Fishers they make (``request``: both for the diagonal's default, the true Fisher's alone for
the spectrum's); a run that also holds another plugin's per-example consumers (``tensorscope-gradients``)
makes one per-example backward per batch for all of them.

**Per-example loss.** Example i (one sequence) with target positions t (the run's
loss targets, ``LossTargets``: next tokens of a causal model, the seeded masked positions of a masked-LM
encoder) and labels y has the loss

    l_i(theta; y) = sum_t m_it * CE(logits_it, y_t)       (the sum, not the mean, over targets)

i.e. minus the log-likelihood of the example's labels, each position's prediction made from
the observed context (teacher forcing). Two label sets give two gradients per example:

- ``true``: y_t ~ softmax(logits_t), drawn independently per target position from the
  model's own distribution (the core's ``sampled`` labels: the "sampled backward" of the true
  Fisher). Because E_{y_t}[grad log p(y_t)] = 0 and positions are drawn independently given the
  context, the cross terms vanish in expectation: E[g_i g_i^T] = sum_t F_it, the sum of the
  positions' Fishers J_t^T (diag p_t - p_t p_t^T) J_t, which is the GGN of l_i (``fisher.lanczos``).
- ``empirical``: y the observed labels (the core's ``observed``); E[g_i g_i^T] is the empirical
  Fisher of the sequence and keeps its cross terms.

A Fisher metric averages g_i g_i^T (or its diagonal) over examples: Fisher information *per
example (sequence)*. Divide by the mean of ``n_targets`` for the Fisher per target token.

**Labels drawn from the model** are the core's ``draw_labels``: the shared forward's logits and a
``torch.Generator`` per example seeded by the run's seed, the batch's task and index within its
task and a CRC-32 of the example's tokens, so they do not depend on the micro-batch size or the
other tasks of the run. (Two identical sequences in one batch draw the same labels: unbiased,
only their two estimates are not independent.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tensorscope_core.plugin_api import ExampleGrads, ModelView, example_grads_layout

#: the core's artifact
ARTIFACT = "per_example_grads"
#: the label set each Fisher's scores are made with
LABELS = {"true": "sampled", "empirical": "observed"}


def request(kinds: Sequence[str], squares: bool = False) -> dict[str, Any]:
    """What a Fisher metric asks of the artifact: every trainable parameter's scores with the label sets of
    ``kinds`` ('true', 'empirical') only, so a run that needs one Fisher makes and holds one set of rows;
    with ``squares``, their squares summed over each batch instead of the rows (a diagonal's mean)."""
    return {"parameters": None, "labels": tuple(LABELS[k] for k in kinds), **({"squares": True} if squares else {})}

Layout = dict[str, tuple[slice, tuple[int, ...]]]


def layout_of(view: ModelView) -> Layout:
    """Where each trainable parameter lies in the score vectors: name -> (slice, shape)."""
    return example_grads_layout(view)


def layout_size(layout: Layout) -> int:
    return max((s.stop for s, _ in layout.values()), default=0)


@dataclass(frozen=True)
class FisherGrads:
    """One batch of per-example score vectors with their layout."""

    layout: Layout
    true: torch.Tensor | None
    empirical: torch.Tensor | None
    n_targets: torch.Tensor
    #: per Fisher asked for with ``squares``: (each entry's square summed over the batch [P] float32, each
    #: example's squared norm [batch] float64)
    summed: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def of(cls, value: Any) -> FisherGrads:
        """From the core artifact's value (asked for every parameter; rows of a label set nobody in the run
        asked rows of are None)."""
        grads: ExampleGrads = value
        made = {kind: grads.of(label) if label in grads.grads else None for kind, label in LABELS.items()}
        summed = {kind: grads.squares[label] for kind, label in LABELS.items() if label in grads.squares}
        return cls(grads.layout, made["true"], made["empirical"], grads.n_targets, summed)

    def scores(self, kind: str) -> torch.Tensor:
        """The scores of Fisher ``kind`` ('true' or 'empirical'), which the metric must have asked for."""
        rows: torch.Tensor | None = getattr(self, kind)
        if rows is None:
            raise KeyError(f"the per-example scores of the {kind} Fisher were not made: ask for them (request)")
        return rows

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A vector [P] (or [..., P]) of this layout -> {parameter name: tensor of its shape}."""
        return {n: flat[..., s].reshape(*flat.shape[:-1], *shape) for n, (s, shape) in self.layout.items()}
