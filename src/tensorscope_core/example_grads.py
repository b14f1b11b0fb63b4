"""The ``per_example_grads`` artifact: per-example gradients, one per-example backward per batch
for every plugin that needs them.

**Per-example loss.** Example i (one sequence) with the run's loss targets t (``LossTargets``:
next tokens of a causal model, the seeded masked positions of a masked-LM encoder) and labels y:

    l_i(theta; y) = sum_t m_it * CE(logits_it, y_t)       (the sum, not the mean, over targets)

Two label sets, asked for by name in a request's ``labels``:

- ``observed``: the targets themselves (the empirical Fisher's scores; divided by the example's
  number of targets, the gradient of its mean token loss, as ``ExampleGrads.mean_observed`` gives);
- ``sampled``: y_t ~ softmax(logits_t) of the shared forward, drawn per target position with a
  generator per example seeded by the run's seed, the batch's task and index within its task and a
  CRC-32 of the example's tokens (``draw_labels``), so the draws do not depend on the micro-batch
  size or the run's other tasks (the true Fisher's "sampled backward").

**Requests.** ``{"parameters": names | None, "labels": ("observed", "sampled")}``: the parameters
to differentiate (None: every trainable one) and the label sets. The scheduler merges one pass's
requests (the union of the parameters, None winning, and of the label sets), so a run with several
consumers makes one per-example backward per micro-batch for all of them.

**Value.** ``ExampleGrads``: the gradients [batch, P] per label set in the model's dtype, the
parameters flattened and concatenated in ``named_parameters`` order (tied parameters once), with
their layout; ``n_targets`` [batch] and the mean observed token loss ``loss`` [batch] in float64.
The gradients come from ``per_example_grads`` (``vmap`` of a ``vjp`` on the hook-free copy, a loop
of single examples for bidirectional encoders). Consumers must not modify the tensors in place.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .artifacts import ArtifactSpec, Request, act_bytes
from .capture import CaptureContext
from .data import Batch
from .functional import offloaded_bytes
from .models.view import ModelView
from .per_example import per_example_calls, per_example_grads

ARTIFACT = "per_example_grads"
#: label sets in the order the gradients are computed (one vjp each from one forward)
LABELS = ("sampled", "observed")

#: parameter name -> (slice of the flat vector, shape)
Layout = dict[str, tuple[slice, tuple[int, ...]]]


def example_grads_layout(view: ModelView, names: Sequence[str] | None = None) -> Layout:
    """Where each of ``names`` (every trainable parameter when None) lies in the flat vectors,
    in ``named_parameters`` order."""
    keep = None if names is None else set(names)
    layout: Layout = {}
    offset = 0
    for name, p in view.named_parameters():
        if p.requires_grad and (keep is None or name in keep):
            layout[name] = (slice(offset, offset + p.numel()), tuple(p.shape))
            offset += p.numel()
    return layout


@dataclass(frozen=True)
class ExampleGrads:
    """One batch of the artifact: per-example gradients per label set, with their layout."""

    layout: Layout
    grads: dict[str, torch.Tensor]
    n_targets: torch.Tensor
    loss: torch.Tensor

    @property
    def size(self) -> int:
        return max((s.stop for s, _ in self.layout.values()), default=0)

    def columns(self, names: Sequence[str]) -> torch.Tensor | None:
        """Indices of ``names``' entries in the flat vectors (None: all of them, in order)."""
        if list(names) == list(self.layout):
            return None
        spans = [torch.arange(self.layout[n][0].start, self.layout[n][0].stop) for n in names]
        return torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)

    def of(self, labels: str, names: Sequence[str] | None = None) -> torch.Tensor:
        """The gradients [batch, P] of one label set, restricted to ``names`` (in their order)."""
        if labels not in self.grads:
            raise KeyError(f"per_example_grads holds labels {sorted(self.grads)}, not '{labels}': ask for it "
                           "in artifact_requests")
        columns = None if names is None else self.columns(names)
        flat = self.grads[labels]
        return flat if columns is None else flat[:, columns.to(flat.device)]

    def mean_observed(self, names: Sequence[str] | None = None) -> torch.Tensor:
        """Gradients of each example's *mean* token loss (observed labels; 0 without targets)."""
        flat = self.of("observed", names)
        return flat / self.n_targets.clamp(min=1).to(device=flat.device, dtype=flat.dtype)[:, None]

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """A vector [P] (or [..., P]) of this layout -> {parameter name: tensor of its shape}."""
        return {n: flat[..., s].reshape(*flat.shape[:-1], *shape) for n, (s, shape) in self.layout.items()}

    @classmethod
    def cat(cls, parts: Sequence[ExampleGrads]) -> ExampleGrads:
        """The micro-batches of one batch joined along the batch dimension."""
        first = parts[0]
        return cls(first.layout, {k: torch.cat([p.grads[k] for p in parts]) for k in first.grads},
                   torch.cat([p.n_targets for p in parts]), torch.cat([p.loss for p in parts]))


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


def _summed_losses(logits: torch.Tensor, labels: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """One example's summed token NLL per label set: labels [n_sets, seq] -> [n_sets]."""
    weights = target_mask.to(logits.dtype)
    ce = torch.nn.functional.cross_entropy(logits.expand(labels.shape[0], *logits.shape).transpose(1, 2), labels,
                                           reduction="none")
    return (ce * weights).sum(dim=1)


def merge_requests(requests: Sequence[Request]) -> Request:
    """The union of the consumers' parameters (None, every trainable one, wins) and label sets."""
    names: set[str] | None = set()
    labels: set[str] = set()
    for request in requests:
        unknown = set(request) - {"parameters", "labels"}
        if unknown:
            raise ValueError(f"per_example_grads takes 'parameters' and 'labels', not {sorted(unknown)}")
        asked = request.get("labels", ("observed",))
        bad = set(asked) - set(LABELS)
        if bad:
            raise ValueError(f"per_example_grads labels are {LABELS}, not {sorted(bad)}")
        labels.update(asked)
        wanted = request.get("parameters")
        names = None if wanted is None or names is None else names | set(wanted)
    if not requests:
        names = None
    return {"parameters": None if names is None else tuple(sorted(names)),
            "labels": tuple(label for label in LABELS if label in (labels or {"observed"}))}


def _derive(ctx: CaptureContext) -> None:
    batch, targets = ctx.batch, ctx.targets
    if batch is None or targets is None:
        raise RuntimeError("per_example_grads runs inside the shared pass, which sets the batch and its targets")
    request = ctx.request(ARTIFACT) or merge_requests([])
    layout = example_grads_layout(ctx.view, request["parameters"])
    label_sets = request["labels"]
    labels = torch.stack([draw_labels(ctx.outputs.logits, batch, batch.input_ids, ctx.seed) if kind == "sampled"
                          else targets.target_ids for kind in label_sets], dim=1)
    grads, losses = per_example_grads(ctx.view, list(layout), _summed_losses, targets.model_input,
                                      batch.attention_mask, labels, targets.target_mask)
    n_targets = targets.target_mask.sum(dim=1).double().cpu()
    observed = losses[:, label_sets.index("observed")] if "observed" in label_sets else torch.zeros_like(n_targets)
    ctx.store[ARTIFACT] = ExampleGrads(layout, dict(zip(label_sets, grads, strict=True)), n_targets,
                                       observed / n_targets.clamp(min=1))


def _bytes(view: ModelView, batch: int, seq: int, request: Request) -> int:
    """The batch's gradients per label set, and its target counts and losses (float64)."""
    request = request or merge_requests([])
    size = sum(p.numel() for n, p in view.named_parameters() if p.requires_grad
               and (request["parameters"] is None or n in request["parameters"]))
    return len(request["labels"]) * batch * size * view.dtype_bytes + 16 * batch


def _transient(view: ModelView, rows: int, seq: int, request: Request) -> int:
    """What the per-example backward keeps while it runs: a backward of the micro-batch's activations,
    with a tied embedding its two per-example gradients [rows, V, d] beside their sum, and on a
    dispatched model the weights it loads onto the input device (``offloaded_bytes``)."""
    every_parameter = (request or {}).get("parameters") is None
    return act_bytes(view, rows, seq) + (2 * rows * view.tied_embedding_bytes if every_parameter else 0) \
        + offloaded_bytes(view)


def _own_passes(view: ModelView, rows: int, seq: int, request: Request) -> dict[str, int]:
    """One differentiated call of the hook-free copy per micro-batch (``per_example_calls``)."""
    return {"per_example_backward": per_example_calls(view, rows)}


PER_EXAMPLE_GRADS = ArtifactSpec(
    ARTIFACT, "forward",
    "per-example gradients of each example's summed token NLL, with the observed labels and/or labels drawn from "
    "the model (request: parameters, labels): ExampleGrads", lambda v, b, s: _bytes(v, b, s, {}),
    derive=_derive, requires=("token_loss",), own_passes=_own_passes, merge=merge_requests, request_nbytes=_bytes,
    transient_nbytes=_transient)

__all__ = ["ARTIFACT", "PER_EXAMPLE_GRADS", "ExampleGrads", "draw_labels", "example_grads_layout"]
