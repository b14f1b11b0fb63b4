"""lottery.magnitude_masks and lottery.early_bird: magnitude pruning masks, the loss after
pruning, and how early in training the masks settle (Early-Bird tickets, You et al., ICLR 2020).

A mask is True where a weight is kept. Pruning at sparsity s removes the floor(s * n + 1/2)
entries of smallest |w| (ties broken by position, so masks are reproducible): over all
prunable entries together (global) or within each weight matrix (layer-wise).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field, field_validator

from tensorscope_core.plugin_api import (
    Cost,
    LayerValue,
    Metric,
    MetricResult,
    ModelSetMetric,
    ModelView,
    OneDeviceModel,
    Params,
    RunShape,
    ScalarValue,
    SeriesValue,
    Step,
    TextValue,
    batch_loss,
    offloaded_bytes,
)

from .flat import WORK_ENTRIES, kth_smallest, pieces
from .passes import loss_batches

Masks = dict[str, torch.Tensor]


def prunable(view: ModelView, include_embeddings: bool) -> dict[str, torch.Tensor]:
    """The weight matrices pruning acts on: every parameter of two or more dimensions inside a
    block (attention and MLP matrices), plus those outside the blocks (embeddings, unembedding)
    when ``include_embeddings``. Biases and norm gains are never pruned. Tied weights once, as the model
    was built (also on a dispatched model, whose forward may have untied them: ``view.named_parameters``)."""
    layer_of = view.layer_of_parameter()
    return {n: p.detach() for n, p in view.named_parameters()
            if p.dim() >= 2 and (include_embeddings or layer_of[n] is not None)}


@dataclass(frozen=True)
class Cut:
    """Where a magnitude mask cuts a sequence of tensors (in order, flattened): it prunes every entry
    with ``|w| < value`` and the first ``ties`` entries with ``|w| == value`` (value None: none)."""

    value: float | None
    ties: int

    @classmethod
    def of(cls, weights: Mapping[str, torch.Tensor], sparsity: float) -> Cut:
        """The cut pruning the ``floor(s * n + 1/2)`` smallest magnitudes of all of ``weights`` (ties
        broken by position): the n_prune-th smallest magnitude found by radix selection over slices
        (``flat.kth_smallest``), exactly what a stable sort of all entries would prune."""
        n_prune = math.floor(sparsity * sum(w.numel() for w in weights.values()) + 0.5)  # round half up
        if n_prune == 0:
            return cls(None, 0)

        def magnitudes() -> Iterator[torch.Tensor]:
            return (piece.of(weights[piece.name]).abs()[None] for piece in pieces(weights, WORK_ENTRIES))

        value = kth_smallest(magnitudes, [n_prune])[0]
        below = sum(int((m < value).sum()) for m in magnitudes())
        return cls(float(value), n_prune - below)

    def masks(self, weights: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, mask) of each tensor in order, True = kept."""
        seen = 0
        for name, w in weights.items():
            if self.value is None:
                yield name, torch.ones_like(w, dtype=torch.bool)
                continue
            magnitude = w.abs().reshape(-1)
            tied = magnitude == self.value
            pruned = (magnitude < self.value) | (tied & (tied.cumsum(0) + seen <= self.ties))
            seen += int(tied.sum())
            yield name, ~pruned.reshape(w.shape)


def global_masks(weights: Mapping[str, torch.Tensor], sparsity: float) -> Masks:
    """One magnitude threshold over all tensors together."""
    return dict(Cut.of(weights, sparsity).masks(weights))


def layerwise_masks(weights: Mapping[str, torch.Tensor], sparsity: float) -> Masks:
    """Each tensor pruned to the same sparsity on its own."""
    return {name: mask for name, w in weights.items() for _, mask in Cut.of({name: w}, sparsity).masks({name: w})}


def mask_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Normalised Hamming distance: the fraction of entries kept by exactly one of the two masks."""
    differ = sum(int((a[n] != b[n]).sum()) for n in a)
    total = sum(a[n].numel() for n in a)
    return differ / total if total else math.nan


def jaccard(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """|A and B| / |A or B| of the kept entries (1 when both keep nothing)."""
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    return inter / union if union else 1.0


def dice(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """2 |A and B| / (|A| + |B|) of the kept entries (1 when both keep nothing)."""
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    sizes = sum(int(a[n].sum()) + int(b[n].sum()) for n in a)
    return 2 * inter / sizes if sizes else 1.0


def overlap_coefficient(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """|A and B| / min(|A|, |B|) of the kept entries (1 when either keeps nothing)."""
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    smaller = min(sum(int(a[n].sum()) for n in a), sum(int(b[n].sum()) for n in a))
    return inter / smaller if smaller else 1.0


def early_bird(distances: Sequence[float], threshold: float) -> int | None:
    """Index i of the first checkpoint whose mask distance to checkpoint i+1 is below ``threshold``."""
    return next((i for i, d in enumerate(distances) if d < threshold), None)


def sparsity_label(sparsity: float) -> str:
    return f"{sparsity:g}"


class MasksParams(Params):
    sparsities: list[float] = Field([0.0, 0.5, 0.8, 0.9], min_length=1,
                                    description="fractions of the prunable weights to remove, each in [0, 1)")
    include_embeddings: bool = Field(False, description="also prune the matrices outside the blocks "
                                                        "(embeddings, unembedding)")
    max_batches: int | None = Field(None, ge=1, description="evaluate the pruned losses on the run's first this "
                                                            "many batches; None: all")
    compare_masks: str | None = Field(None, description="a metric whose result holds boolean masks per parameter "
                                                        "(e.g. 'fisher.masks'): report the overlap of the "
                                                        "magnitude masks with them")
    compare_prefix: str = Field("mask/", description="prefix of the mask fields in compare_masks' result "
                                                     "(e.g. 'mask/math/' for one task's masks)")

    @field_validator("sparsities")
    @classmethod
    def _valid(cls, values: list[float]) -> list[float]:
        bad = [s for s in values if not 0.0 <= s < 1.0]
        if bad:
            raise ValueError(f"sparsities must lie in [0, 1); got {bad}")
        if len(set(values)) != len(values):
            raise ValueError(f"sparsities must be distinct; got {values}")
        return sorted(values)


class MagnitudeMasks(Metric):
    """Magnitude pruning of the weight matrices (``prunable``: the blocks' matrices; with
    ``include_embeddings`` also the embeddings) at each sparsity s of ``sparsities``.

    - ``mask/<s>/<param>``: the global mask (one |w| threshold over all prunable weights;
      True = kept), a boolean tensor per parameter, as other metrics read masks;
    - ``block_sparsity/<s>``: per block, the fraction of its prunable weights the global mask removes;
    - ``loss_global``, ``loss_layerwise``: the run's token loss with the pruned weights
      (global masks; each matrix pruned to s on its own), per sparsity: the pruning
      robustness curve; ``loss_dense`` is the unpruned loss on the same batches and
      ``loss_increase_global`` the difference;
    - with ``compare_masks``: ``compare_jaccard`` and ``compare_overlap`` (overlap
      coefficient) between the global mask at each s and the other metric's masks, over the
      prunable parameters that have one.

    Losses go through a hook-free copy with the masked weights passed in; the model is never modified.
    On a dispatched model every weight is loaded onto the input device while the cuts are found and while
    a batch's losses are evaluated (``OneDeviceModel``).
    """

    name = "lottery.magnitude_masks"
    version = "1"
    summary = "global and layer-wise magnitude pruning masks, the loss after pruning, overlap with other masks"
    Params = MasksParams
    artifacts = ("batches",)  # the batches only; losses are recomputed per mask
    supports_dispatch = True  # its forwards run on OneDeviceModel, which loads a dispatched model's weights
    fields = {"mask/<s>/<param>": "global magnitude mask at sparsity s (True = kept), shaped like the parameter",
              "block_sparsity/<s>": "per block: fraction of its prunable weights removed by the global mask",
              "sparsities": "the sparsities, in increasing order",
              "loss_dense": "token loss of the unpruned model on the batches used",
              "loss_global": "token loss after global pruning, per sparsity",
              "loss_layerwise": "token loss after layer-wise pruning, per sparsity",
              "loss_increase_global": "loss_global - loss_dense, per sparsity",
              "compare_jaccard": "Jaccard index of the kept entries with compare_masks' masks, per sparsity",
              "compare_overlap": "overlap coefficient with compare_masks' masks, per sparsity"}

    @classmethod
    def metric_needs(cls, params: MasksParams) -> tuple[str, ...]:
        return () if params.compare_masks is None else (params.compare_masks,)

    @classmethod
    def cost(cls, params: MasksParams, view: ModelView, shape: RunShape) -> Cost:
        """The pruned copy of the prunable weights a loss is evaluated with (``pruned``, their dtype)
        and the loss sums; the masks are kept as cuts (a magnitude and a tie count per mask), made
        again one tensor at a time when used. Results, which finalize makes beside the state: every
        sparsity's global masks (one byte per prunable entry each). On a dispatched model, the weights
        loaded onto the input device while a batch is evaluated and while finalize makes the masks
        (``offloaded_bytes``)."""
        weights = prunable(view, params.include_embeddings).values()
        pruned = sum(w.numel() * w.element_size() for w in weights)
        masks = len(params.sparsities) * sum(w.numel() for w in weights)
        batches = shape.n_batches if params.max_batches is None else min(shape.n_batches, params.max_batches)
        forward = 2.0 * view.n_params * shape.batch_size * shape.seq_len
        loaded = offloaded_bytes(view)
        return Cost(state_bytes=pruned + 8 * (2 * len(params.sparsities) + 2), finalize_bytes=masks + loaded,
                    transient_bytes=loaded, result_bytes=masks,
                    flops=float((2 * len(params.sparsities) + 1) * batches * forward))

    @classmethod
    def own_passes(cls, params: MasksParams, view: ModelView, shape: RunShape) -> dict[str, int]:
        """Per batch used (the first ``max_batches`` with a loss target) one dense forward and one per
        sparsity and mask family (global, layer-wise): ``(1 + 2 * len(sparsities)) * batches``."""
        per_batch = 1 + 2 * len(params.sparsities)
        return {"replay_forward": per_batch * loss_batches(view, shape, params.max_batches)}

    def _model(self) -> OneDeviceModel:
        """The model as a function of the prunable weights (a dispatched model's loaded onto one device)."""
        return OneDeviceModel(self.view, prunable(self.view, self.params.include_embeddings))

    def setup(self) -> None:
        weights = self._model().weights
        if not weights:
            raise ValueError(f"{self.view.name} has no weight matrix to prune inside its blocks; "
                             "set include_embeddings=True to prune the embeddings")
        #: each sparsity's global cut, and per tensor its layer-wise cut (see ``Cut``: no mask is held)
        self.global_ = [Cut.of(weights, s) for s in self.params.sparsities]
        self.layerwise = [{n: Cut.of({n: w}, s) for n, w in weights.items()} for s in self.params.sparsities]
        #: the pruned weights a loss is evaluated with (one copy, reused)
        self.pruned = {n: torch.empty_like(w) for n, w in weights.items()}
        self.sums = torch.zeros(2, len(self.params.sparsities), dtype=torch.float64)
        self.dense = torch.zeros(2, dtype=torch.float64)  # loss sum, targets
        self.batches = 0

    def update(self, step: Step) -> None:
        if self.params.max_batches is not None and self.batches >= self.params.max_batches:
            return
        view, batch, targets = self.view, step.batch, step.targets
        n = targets.n_targets
        if n == 0:
            return
        model = self._model()
        weights = model.weights
        with torch.no_grad():
            # the dense loss by the same arithmetic as the pruned ones: sparsity 0 gives exactly it
            self.dense += torch.tensor([float(batch_loss(view, batch, targets, model=model)) * n, n],
                                       dtype=torch.float64)
            for col, (cut, cuts) in enumerate(zip(self.global_, self.layerwise, strict=True)):
                for name, mask in cut.masks(weights):
                    torch.mul(weights[name], mask, out=self.pruned[name])
                self.sums[0, col] += float(batch_loss(view, batch, targets, self.pruned, model)) * n
                for name, w in weights.items():
                    for _, mask in cuts[name].masks({name: w}):
                        torch.mul(w, mask, out=self.pruned[name])
                self.sums[1, col] += float(batch_loss(view, batch, targets, self.pruned, model)) * n
        self.batches += 1

    def finalize(self) -> dict[str, Any]:
        if self.dense[1] == 0:
            raise ValueError("no batch had a loss target: the pruned losses need data with at least two tokens "
                             "per sequence (causal) or a mask token (masked LM)")
        tokens = float(self.dense[1])
        dense = float(self.dense[0]) / tokens
        losses = self.sums / tokens
        sparsities = self.params.sparsities
        out: dict[str, Any] = {
            "sparsities": SeriesValue(values=list(sparsities), index_name="sparsity"),
            "loss_dense": ScalarValue(value=dense, n=int(tokens), unit="nats"),
            "loss_global": SeriesValue(values=losses[0].tolist(), index_name="sparsity"),
            "loss_layerwise": SeriesValue(values=losses[1].tolist(), index_name="sparsity"),
            "loss_increase_global": SeriesValue(values=(losses[0] - dense).tolist(), index_name="sparsity")}
        layer_of = self.view.layer_of_parameter()
        weights = self._model().weights
        for s, cut in zip(sparsities, self.global_, strict=True):
            label = sparsity_label(s)
            removed = torch.zeros(self.view.n_layers, dtype=torch.float64)
            total = torch.zeros(self.view.n_layers, dtype=torch.float64)
            for name, mask in cut.masks(weights):
                layer = layer_of[name]
                out[f"mask/{label}/{name}"] = mask
                if layer is not None:
                    removed[layer] += float((~mask).sum())
                    total[layer] += mask.numel()
            out[f"block_sparsity/{label}"] = LayerValue(values=(removed / total.clamp(min=1)).tolist(), axis="block")
        if self.params.compare_masks is not None:
            out.update(self._compare(weights))
        return out

    def _compare(self, weights: dict[str, torch.Tensor]) -> dict[str, Any]:
        source = self.params.compare_masks
        result = self.deps[source]  # type: ignore[index]
        prefix = self.params.compare_prefix
        names = [n for n in weights if f"{prefix}{n}" in result.values]
        if not names:
            fields = sorted(result.values)[:5]
            raise ValueError(f"{source} has no mask field '{prefix}<parameter>' for any prunable parameter "
                             f"(its fields start {fields}); set compare_prefix to the prefix of its masks")
        other = {n: self.tensor_of(result, f"{prefix}{n}").bool().cpu() for n in names}
        jaccards, overlaps = [], []
        for cut in self.global_:  # one sparsity's masks at a time
            mine = {n: m for n, m in cut.masks(weights) if n in other}
            jaccards.append(jaccard(mine, other))
            overlaps.append(overlap_coefficient(mine, other))
        return {"compare_jaccard": SeriesValue(values=jaccards, index_name="sparsity"),
                "compare_overlap": SeriesValue(values=overlaps, index_name="sparsity")}


class EarlyBirdParams(Params):
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="which of lottery.magnitude_masks' sparsities "
                                                             "to compare")
    threshold: float = Field(0.1, gt=0.0, le=1.0, description="an Early-Bird ticket is found at the first "
                                                              "checkpoint whose mask distance to the next is "
                                                              "below this (You et al. use 0.1)")


class EarlyBird(ModelSetMetric):
    """Early-Bird detection over checkpoints in the order they were given (You et al., ICLR
    2020, with magnitude masks of the weights instead of channel masks): the mask distance
    between checkpoints i and j is the fraction of prunable entries that exactly one of their
    global masks at ``sparsity`` keeps (normalised Hamming distance, from
    ``lottery.magnitude_masks``). The Early-Bird checkpoint is the first i whose distance to
    checkpoint i+1 is below ``threshold``: from there on the ticket barely changes.
    """

    reads_weights = False  # the checkpoints' lottery.magnitude_masks results only
    name = "lottery.early_bird"
    min_models = 2  # a comparison: the core skips a smaller set with the fix
    version = "1"
    summary = "mask distances between consecutive checkpoints and the first where the pruning mask settles"
    Params = EarlyBirdParams
    requires_metrics = ("lottery.magnitude_masks",)
    fields = {"distances": "mask distance of each checkpoint to the next, in the order given",
              "pairwise": "mask distance between every pair of checkpoints, a tensor [models, models]",
              "early_bird_index": "index of the Early-Bird checkpoint (NaN: none found)",
              "early_bird": "its name, or a sentence saying that none was found"}


    def compute_set(self, views: Mapping[str, ModelView],
                    results: Mapping[str, Mapping[str, MetricResult]]) -> dict[str, Any]:
        names = list(results)
        label = sparsity_label(self.params.sparsity)
        masks = [self._masks(results[n]["lottery.magnitude_masks"], label) for n in names]
        pairwise = torch.tensor([[mask_distance(a, b) for b in masks] for a in masks], dtype=torch.float64)
        distances = [float(pairwise[i, i + 1]) for i in range(len(names) - 1)]
        found = early_bird(distances, self.params.threshold)
        text = (f"none: no checkpoint's mask distance to the next is below {self.params.threshold:g}"
                if found is None else names[found])
        return {"distances": SeriesValue(values=distances, index_name="checkpoint"), "pairwise": pairwise,
                "early_bird_index": ScalarValue(value=math.nan if found is None else float(found)),
                "early_bird": TextValue(text=text)}

    def _masks(self, result: MetricResult, label: str) -> Masks:
        prefix = f"mask/{label}/"
        names = [k[len(prefix):] for k in result.values if k.startswith(prefix)]
        if not names:
            have = result.params.get("sparsities")
            raise ValueError(f"lottery.magnitude_masks has no masks at sparsity {label} (it ran with sparsities "
                             f"{have}): add {label} to its sparsities or set lottery.early_bird.sparsity")
        return {n: self.tensor_of(result, prefix + n).bool() for n in names}
