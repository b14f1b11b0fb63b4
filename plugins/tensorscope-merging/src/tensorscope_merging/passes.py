"""How many of the run's batches the loss-based metrics replay: what their declared passes count.

A per-model loss metric (``landscape.*``, ``lottery.magnitude_masks``) skips a batch without a
loss target and stops after ``max_batches`` batches that have one. Whether a batch has a target
follows from the model and the batch's padded length alone (``RunShape.batches``): a causal
model predicts every real token after the first, so a right-padded batch whose longest row has
two or more tokens has a target; a masked LM with a mask token masks at least one token of
every non-empty row; one without a mask token has none.
"""

from __future__ import annotations

from tensorscope_core.plugin_api import ModelView, RunShape


def has_loss_target(view: ModelView, padded_length: int) -> bool:
    """Whether a batch of this padded length has at least one loss target on ``view``."""
    if view.causal:
        return padded_length >= 2
    return view.mask_token_id is not None and padded_length >= 1


def loss_batches(view: ModelView, shape: RunShape, max_batches: int | None) -> int:
    """The batches, in data order, with a loss target, at most ``max_batches`` (None: all)."""
    lengths = [length for _, length, _ in shape.batches] if shape.batches else [shape.seq_len] * shape.n_batches
    used = sum(1 for length in lengths if has_loss_target(view, length))
    return used if max_batches is None else min(used, max_batches)
