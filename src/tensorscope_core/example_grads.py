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

**Requests.** ``{"parameters": names | None, "labels": ("observed", "sampled"), "sketch": k}``: the
parameters to differentiate (None: every trainable one), the label sets, and (optional) ``sketch``: the
consumer wants only the count sketch to k dimensions of its parameters' gradient (``CountSketch`` seeded
with the run's seed, as the consumer would draw it) and their exact squared norms, not the gradients.
The scheduler merges one pass's requests (the union of the parameters, None winning, and of the label
sets; the distinct sketches), so a run with several consumers makes one per-example backward per
micro-batch for all of them.

**Sketches at scale.** A sketch is made per micro-batch from the gradients parameter by parameter, as
they come out of the backward (``per_example_grad_parts``), so when every consumer asks for one the
artifact never concatenates a [batch, P] copy nor keeps one across micro-batches: it holds [batch, k]
per sketch, and a micro-batch's gradients only while they are sketched. At 7B parameters and k = 1024 that
is 32 KiB against 50 GiB for a batch of 4 (the TRAK / LoGra way of keeping per-example gradients).

**Squares.** ``"squares": True``: the consumer wants, per label set, each gradient entry's square summed over
the batch's examples (float32 [P], the artifact's layout) and each example's exact squared norm (float64),
not the gradients: what a diagonal Fisher's mean needs. They are summed per micro-batch one parameter at a
time into one running sum for the batch (``CaptureContext.batch_sums``), so when no consumer wants the rows
the artifact holds [P] per label set, not [batch, P].

**Value.** ``ExampleGrads``: the gradients [batch, P] per label set in the model's dtype (when a consumer
asked for them), the parameters flattened and concatenated in ``named_parameters`` order (tied parameters
once), with their layout; the sketches (``sketched``); ``n_targets`` [batch] and the mean observed token
loss ``loss`` [batch] in float64. The gradients come from ``per_example_grads`` (``vmap`` of a ``vjp`` on
the hook-free copy, a loop of single examples for bidirectional encoders). Consumers must not modify the
tensors in place.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .artifacts import ArtifactSpec, Request, act_bytes
from .capture import CaptureContext
from .data import Batch
from .example_store import CountSketch, row_squares
from .functional import offloaded_bytes
from .models.view import ModelView
from .per_example import per_example_calls, per_example_grad_parts

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


#: a requested sketch: (its parameters, sorted, or None for every trainable one; k)
SketchKey = tuple[tuple[str, ...] | None, int]


def sketch_key(parameters: Sequence[str] | None, k: int) -> SketchKey:
    """The key a consumer that asked for ``{"parameters": parameters, "sketch": k}`` finds its sketch under."""
    return (None if parameters is None else tuple(sorted(parameters)), k)


@dataclass(frozen=True)
class ExampleGrads:
    """One batch of the artifact: per-example gradients per label set, with their layout, and the
    requested sketches: key -> label set -> (sketch [batch, k], exact squared norms [batch]), float64 on
    the CPU, of each example's summed-loss gradient on the key's parameters."""

    layout: Layout
    grads: dict[str, torch.Tensor]
    n_targets: torch.Tensor
    loss: torch.Tensor
    sketches: dict[SketchKey, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    #: with a ``squares`` request: label set -> (squares summed over the batch [P] float32, squared norms
    #: [batch] float64)
    squares: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def summed_squares(self, labels: str = "observed") -> tuple[torch.Tensor, torch.Tensor]:
        """(sum over the batch's examples of each entry's square [P] float32, each example's squared norm
        [batch] float64) asked for as ``{"squares": True}``."""
        if labels not in self.squares:
            raise KeyError(f"per_example_grads summed the squares of labels {sorted(self.squares)}, not "
                           f"'{labels}': ask for them with \"squares\": True in artifact_requests")
        return self.squares[labels]

    def sketched(self, parameters: Sequence[str] | None, k: int,
                 labels: str = "observed") -> tuple[torch.Tensor, torch.Tensor] | None:
        """(sketch [batch, k], exact squared norms [batch]) asked for as ``{"parameters": parameters,
        "sketch": k}``, or None where the run made the gradients instead (another request of the same
        consumer kind merged otherwise, or an older core)."""
        return self.sketches.get(sketch_key(parameters, k), {}).get(labels)

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
        sketches = {key: {label: (torch.cat([p.sketches[key][label][0] for p in parts]),
                                  torch.cat([p.sketches[key][label][1] for p in parts])) for label in by_label}
                    for key, by_label in first.sketches.items()}
        # every micro-batch's summed squares are the batch's one running sum (``batch_sums``): the last holds all
        squares = {label: (parts[-1].squares[label][0], torch.cat([p.squares[label][1] for p in parts]))
                   for label in first.squares}
        return cls(first.layout, {k: torch.cat([p.grads[k] for p in parts]) for k in first.grads},
                   torch.cat([p.n_targets for p in parts]), torch.cat([p.loss for p in parts]), sketches, squares)


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
    """The union of the consumers' parameters (None, every trainable one, wins) and label sets; whether any
    consumer wants the gradients themselves (``rows``: one without ``sketch`` or ``squares``), the distinct
    sketches, and whether any wants the summed squares."""
    names: set[str] | None = set()
    labels: set[str] = set()
    sketches: set[SketchKey] = set()
    rows = not requests
    squares = False
    for request in requests:
        unknown = set(request) - {"parameters", "labels", "sketch", "squares"}
        if unknown:
            raise ValueError(f"per_example_grads takes 'parameters', 'labels', 'sketch' and 'squares', "
                             f"not {sorted(unknown)}")
        if not isinstance(request.get("squares", False), bool):
            raise ValueError(f"per_example_grads squares is True or False, not {request['squares']!r}")
        squares = squares or request.get("squares", False)
        asked = request.get("labels", ("observed",))
        bad = set(asked) - set(LABELS)
        if bad:
            raise ValueError(f"per_example_grads labels are {LABELS}, not {sorted(bad)}")
        labels.update(asked)
        wanted = request.get("parameters")
        names = None if wanted is None or names is None else names | set(wanted)
        k = request.get("sketch")
        if k is None:
            rows = rows or not request.get("squares", False)
        elif not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"per_example_grads sketch is a number of dimensions (an int >= 1), not {k!r}")
        else:
            sketches.add(sketch_key(wanted, k))
    if not requests:
        names = None
    return {"parameters": None if names is None else tuple(sorted(names)),
            "labels": tuple(label for label in LABELS if label in (labels or {"observed"})),
            "rows": rows, "sketches": tuple(sorted(sketches, key=repr)), "squares": squares}


def _derive(ctx: CaptureContext) -> None:
    batch, targets = ctx.batch, ctx.targets
    if batch is None or targets is None:
        raise RuntimeError("per_example_grads runs inside the shared pass, which sets the batch and its targets")
    request = ctx.request(ARTIFACT) or merge_requests([])
    layout = example_grads_layout(ctx.view, request["parameters"])
    label_sets = request["labels"]
    labels = torch.stack([draw_labels(ctx.outputs.logits, batch, batch.input_ids, ctx.seed) if kind == "sampled"
                          else targets.target_ids for kind in label_sets], dim=1)
    names = list(layout)
    parts, losses = per_example_grad_parts(ctx.view, names, _summed_losses, targets.model_input,
                                           batch.attention_mask, labels, targets.target_mask)
    rows = batch.input_ids.shape[0]
    sketches = {key: {label: _sketch(part, names, key, ctx.seed) for label, part in zip(label_sets, parts, strict=True)}
                for key in request.get("sketches", ())}
    squares = {label: _summed_squares(ctx, label, part, names, layout) for label, part in zip(label_sets, parts,
                                                                                           strict=True)} \
        if request.get("squares") else {}
    grads: dict[str, torch.Tensor] = {}
    if request.get("rows", True):
        dtype = next(iter(parts[0].values())).dtype if names else torch.float32
        for label, part in zip(label_sets, parts, strict=True):
            grads[label] = torch.cat([part[n].reshape(rows, -1).to(dtype) for n in names], dim=1) if names \
                else torch.zeros(rows, 0, dtype=dtype, device=batch.input_ids.device)
            part.clear()  # each parameter's gradient goes once it is in the flat copy
    del parts
    n_targets = targets.target_mask.sum(dim=1).double().cpu()
    observed = losses[:, label_sets.index("observed")] if "observed" in label_sets else torch.zeros_like(n_targets)
    ctx.store[ARTIFACT] = ExampleGrads(layout, grads, n_targets, observed / n_targets.clamp(min=1), sketches,
                                       squares)


def _summed_squares(ctx: CaptureContext, label: str, part: dict[str, torch.Tensor], names: list[str],
                    layout: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    """Each entry's square summed over this micro-batch's examples into the batch's running sum (float32
    [P], one parameter at a time, an example at a time as a diagonal accumulator adds rows), and each
    example's exact squared norm (float64)."""
    rows = next(iter(part.values())).shape[0] if part else 0
    size = max((sl.stop for sl, _ in layout.values()), default=0)
    device = next(iter(part.values())).device if part else torch.device("cpu")
    key = (ARTIFACT, "squares", label)
    if key not in ctx.batch_sums:  # the batch's first micro-batch (no [P] zeros made for the others)
        ctx.batch_sums[key] = torch.zeros(size, dtype=torch.float32, device=device)
    total = ctx.batch_sums[key]
    norms = torch.zeros(rows, dtype=torch.float64)
    for name in names:
        piece = part[name].reshape(rows, -1)
        norms += row_squares(piece.cpu())
        into = total[layout[name][0]]
        for row in piece.float():
            into.addcmul_(row, row)
    return total, norms


def _sketch(part: dict[str, torch.Tensor], names: list[str], key: SketchKey,
            seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(count sketch [rows, k], exact squared norms [rows]) of the gradients of ``key``'s parameters, one
    parameter at a time in ``named_parameters`` order: the consumer's own ``CountSketch(size, k, seed)``
    of its flat rows, without them."""
    wanted = names if key[0] is None else [n for n in names if n in set(key[0])]
    rows = next(iter(part.values())).shape[0] if part else 0
    pieces = [part[n].reshape(rows, -1) for n in wanted]
    size = sum(p.shape[1] for p in pieces)
    squares = torch.zeros(rows, dtype=torch.float64)
    for piece in pieces:
        squares += row_squares(piece.cpu())
    return CountSketch(size, key[1], seed).of_parts(pieces), squares


def _size(view: ModelView, parameters: Sequence[str] | None) -> int:
    key = ("per_example_grads.size", None if parameters is None else tuple(parameters))
    return view.memoised(key, lambda: sum(p.numel() for n, p in view.named_parameters() if p.requires_grad
                                          and (parameters is None or n in parameters)))


def _bytes(view: ModelView, batch: int, seq: int, request: Request) -> int:
    """The batch's gradients per label set (when a consumer wants them), its sketches with their squared
    norms (float64), and its target counts and losses (float64)."""
    request = request or merge_requests([])
    labels = len(request["labels"])
    size = _size(view, request["parameters"])
    rows = labels * batch * size * view.dtype_bytes if request.get("rows", True) else 0
    sketches = sum(labels * batch * (k + 1) * 8 for _, k in request.get("sketches", ()))
    squares = labels * (size * 4 + batch * 8) if request.get("squares") else 0
    return rows + sketches + squares + 16 * batch


def _transient(view: ModelView, rows: int, seq: int, request: Request) -> int:
    """What the per-example backward keeps while it runs: a backward of the micro-batch's activations,
    with a tied embedding its two per-example gradients [rows, V, d] beside their sum, and on a
    dispatched model the weights it loads onto the input device (``offloaded_bytes``). When only sketches
    or summed squares are asked for, the micro-batch's gradients too, which no batch-sized copy holds (a
    sketch's own pieces, one span of ``CountSketch.SPAN`` entries in float64 at a time, beside them; for
    the squares, one parameter's gradients in float32 and on the host for the norms, where they are not)."""
    request = request or merge_requests([])
    reduced_only = not request.get("rows", True)
    parts = len(request["labels"]) * rows * _size(view, request["parameters"]) * view.dtype_bytes \
        + 2 * rows * CountSketch.SPAN * 8 if reduced_only else 0
    if reduced_only and request.get("squares"):  # a float32 copy unless float32, a host copy unless on the host
        copies = (0 if view.dtype_bytes == 4 else 4) + (0 if view.input_device.type == "cpu" else view.dtype_bytes)
        parts += rows * _largest_parameter(view, request["parameters"]) * copies
    # The tied pair is held at the backward's end, beside every other gradient (the parts); with the
    # rows, what follows (the gradients beside their flat copy) holds more, and the memory audit checks
    # these metrics as they were declared: the pair counted for parameters=None only.
    asked = _tied_embedding_asked(view, request["parameters"]) if reduced_only else request["parameters"] is None
    tied = 2 * rows * view.tied_embedding_bytes if asked else 0
    return act_bytes(view, rows, seq) + tied + offloaded_bytes(view) + parts


def _largest_parameter(view: ModelView, parameters: Sequence[str] | None) -> int:
    key = ("per_example_grads.largest", None if parameters is None else tuple(parameters))
    return view.memoised(key, lambda: max((p.numel() for n, p in view.named_parameters() if p.requires_grad
                                           and (parameters is None or n in parameters)), default=0))


def _tied_embedding_asked(view: ModelView, parameters: Sequence[str] | None) -> bool:
    """Whether the gradients asked for include an embedding the output layer shares (named, or every one)."""
    if not view.tied_embedding_bytes:
        return False
    weight = view.embed.weight
    return parameters is None or any(p is weight for n, p in view.named_parameters() if n in parameters)


def _own_passes(view: ModelView, rows: int, seq: int, request: Request) -> dict[str, int]:
    """One differentiated call of the hook-free copy per micro-batch (``per_example_calls``)."""
    return {"per_example_backward": per_example_calls(view, rows)}


PER_EXAMPLE_GRADS = ArtifactSpec(
    ARTIFACT, "forward",
    "per-example gradients of each example's summed token NLL, with the observed labels and/or labels drawn from "
    "the model (request: parameters, labels): ExampleGrads", lambda v, b, s: _bytes(v, b, s, {}),
    derive=_derive, requires=("token_loss",), own_passes=_own_passes, merge=merge_requests, request_nbytes=_bytes,
    transient_nbytes=_transient)

__all__ = ["ARTIFACT", "PER_EXAMPLE_GRADS", "ExampleGrads", "SketchKey", "draw_labels", "example_grads_layout",
           "sketch_key"]
