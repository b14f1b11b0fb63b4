"""lottery.imp and lottery.imp_overlap: iterative magnitude pruning with rewinding (Frankle & Carbin,
ICLR 2019; rewinding to an early step: Frankle, Dziugaite, Roy & Carbin, ICML 2020) on a copy of
the weights, and how much the final tickets of several checkpoints share.

Masks are ``lottery``'s: True = kept, the prunable tensors of ``lottery.prunable``, magnitudes cut
by ``lottery.global_masks`` / ``lottery.layerwise_masks`` (ties broken by position). Each round
prunes a fraction of the *surviving* entries: the cut runs on the survivors alone, so a pruned
entry never comes back and the survivors' order is the one a one-shot cut would use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from tensorscope_core.plugin_api import (
    Batch,
    Cost,
    LossTargets,
    Metric,
    MetricResult,
    ModelSetMetric,
    ModelView,
    NoParams,
    NotApplicable,
    OneDeviceModel,
    Params,
    Rung,
    RunShape,
    ScalarValue,
    SeriesValue,
    Step,
    act_bytes,
    batch_loss,
    offloaded_bytes,
    trainable_model,
)

from .lottery import Masks, dice, global_masks, jaccard, layerwise_masks, prunable
from .passes import has_loss_target

#: bytes a stored batch holds per token: input ids, attention mask, and the targets' model input,
#: target ids and target mask (int64 each, as the core makes them)
BATCH_BYTES_PER_TOKEN = 5 * 8


class ImpParams(Params):
    rounds: int = Field(3, ge=1, le=100, description="pruning rounds n (the ticket's sparsity is 1 - (1 - p)^n)")
    prune_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="fraction p of the surviving prunable "
                                                                   "weights removed each round")
    steps: int = Field(20, ge=1, description="SGD steps K of the first training; the run's batches with a loss "
                                             "target, in data order, cycled")
    rewind_step: int = Field(0, ge=0, description="r: after each pruning the weights go back to their values "
                                                  "after r steps of the first training (0: the model as given) "
                                                  "and train steps r..K-1 again")
    lr: float = Field(1e-3, ge=0.0, description="SGD learning rate (0: no training; IMP is then iterated "
                                                "one-shot pruning)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (torch.optim.SGD; the buffer "
                                                             "starts empty at every training)")
    scope: Literal["layer", "global"] = Field("layer", description="'layer': each weight matrix loses p of its "
                                                                   "survivors; 'global': one threshold over all")
    include_embeddings: bool = Field(False, description="also prune the matrices outside the blocks "
                                                        "(embeddings, unembedding), as lottery.magnitude_masks")

    @model_validator(mode="after")
    def _rewind_inside_training(self) -> ImpParams:
        if self.rewind_step >= self.steps:
            raise ValueError(f"rewind_step must be below steps (the rewound weights retrain steps r..K-1); "
                             f"got rewind_step={self.rewind_step}, steps={self.steps}")
        return self


def train_batch_shapes(view: ModelView, shape: RunShape, steps: int) -> list[tuple[int, int]]:
    """(rows, padded length) of the batches the training cycles: the first ``steps`` with a loss target."""
    layout = [(rows, length) for rows, length, _ in shape.batches] or [(shape.batch_size, shape.seq_len)] * \
        shape.n_batches
    return [(rows, length) for rows, length in layout if has_loss_target(view, length)][:steps]


def prune_survivors(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], fraction: float,
                    scope: str) -> Masks:
    """``masks`` with ``fraction`` of their kept entries removed by magnitude of ``weights``: the
    lottery cut (global or per tensor) of the surviving entries alone, in their order."""
    survivors = {n: w[masks[n]] for n, w in weights.items()}
    cut = global_masks(survivors, fraction) if scope == "global" else layerwise_masks(survivors, fraction)
    out: Masks = {}
    for name, mask in masks.items():
        out[name] = torch.zeros_like(mask)
        out[name][mask] = cut[name]
    return out


def one_shot_masks(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], scope: str) -> Masks:
    """The one-shot magnitude masks of ``weights`` pruning as many entries as ``masks`` do: in all
    (global) or per tensor (layer)."""
    def fraction(names: Sequence[str]) -> float:
        return sum(int((~masks[n]).sum()) for n in names) / sum(masks[n].numel() for n in names)

    if scope == "global":
        return global_masks(weights, fraction(list(weights)))
    return {n: global_masks({n: w}, fraction([n]))[n] for n, w in weights.items()}


def sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of the entries the masks remove."""
    return sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


class IterativeMagnitudePruning(Metric):
    """Iterative magnitude pruning with rewinding on a copy of the model's trainable weights.

    Round 0 trains the dense copy K = ``steps`` SGD steps (``lr``, ``momentum``) on the run's
    batches with a loss target, in data order, cycled (the run's token loss, ``batch_loss``),
    keeping the weights after r = ``rewind_step`` steps. Round i = 1..n (``rounds``) removes
    ``prune_fraction`` p of the surviving prunable entries by magnitude of the trained weights
    (per matrix, or globally with ``scope='global'``; the tensors of
    ``lottery.magnitude_masks``), rewinds every weight to step r (r = 0: the model as given)
    with the pruned entries zero, and trains steps r..K-1 again with the pruned entries' gradient
    zeroed (they stay 0). The optimiser restarts (empty momentum) at every training; there is no
    randomness (batches in order, the model's dropout off), so a run is reproducible.

    Per round: ``sparsity`` (of the prunable entries: 1 - (1 - p)^i up to rounding), ``loss``
    after the round's training (token-weighted over the batches cycled), the mask's Jaccard
    index and Dice coefficient with the previous round's (round 0: all kept) and with the
    one-shot magnitude mask of the given weights that prunes as many entries (per matrix with
    ``scope='layer'``). ``ticket/<param>`` is the final mask. With lr = 0 nothing trains and the
    masks equal the one-shot masks exactly (Jaccard 1).
    """

    name = "lottery.imp"
    version = "1"
    summary = "iterative magnitude pruning with rewinding: per-round sparsity, loss, mask overlaps; the ticket"
    Params = ImpParams
    artifacts = ("batches",)  # the batches only: it trains on them itself
    supports_dispatch = True  # it trains a copy through trainable_model, which loads a dispatched model's weights
    fields = {"sparsity": "fraction of the prunable entries removed, per round 0..n",
              "loss": "token loss after each round's training, per round 0..n",
              "jaccard_previous": "Jaccard index of the kept entries with the previous round's mask, rounds 1..n",
              "dice_previous": "Dice coefficient with the previous round's mask, rounds 1..n",
              "jaccard_one_shot": "Jaccard index with the one-shot magnitude mask of the given weights at the "
                                  "same sparsity, rounds 1..n",
              "dice_one_shot": "Dice coefficient with that one-shot mask, rounds 1..n",
              "final_sparsity": "the ticket's sparsity", "final_loss": "its loss after training",
              "steps_trained": "SGD steps in all: K + n (K - r)",
              "train_batches": "batches the training cycles",
              "ticket/<param>": "the final mask (True = kept), shaped like the parameter"}

    @classmethod
    def cost(cls, params: ImpParams, view: ModelView, shape: RunShape) -> Cost:
        """The trained copy of the trainable weights, its gradients, SGD's momentum (momentum > 0)
        and the rewind point (r > 0; at r = 0 the model's own weights are the rewind point); three
        boolean masks of the prunable entries (this round's, the previous, the one-shot one); the
        batches cycled (int64 ids, attention mask and targets). Transient, the larger of: a training
        step's backward (its activations and, tied, the embedding's second gradient until summed) and a
        pruning (the survivors' values, and for the largest tensor its magnitudes, two int64 running
        counts of ties and two boolean masks: ``lottery.Cut.masks``). Results: the ticket (this round's mask).
        Finalize, on a dispatched model: the given weights loaded onto the input device (``offloaded_bytes``)."""
        trainable = [p for p in view.model.parameters() if p.requires_grad]
        weights = sum(p.numel() * p.element_size() for p in trainable)
        copies = 2 + int(params.momentum > 0) + int(params.rewind_step > 0)
        pruned = prunable(view, params.include_embeddings).values()
        masks = 3 * sum(w.numel() for w in pruned)
        backward = act_bytes(view, shape.batch_size, shape.seq_len) + view.tied_embedding_bytes
        largest = max((w.numel() for w in pruned), default=0)
        pruning = sum(w.numel() * w.element_size() for w in pruned) + largest * (view.dtype_bytes + 2 * 8 + 2)
        batches = train_batch_shapes(view, shape, params.steps)
        tokens = sum(rows * length for rows, length in batches)
        n_params = sum(p.numel() for p in trainable)
        per_token = 2.0 * n_params
        steps = params.steps + params.rounds * (params.steps - params.rewind_step)
        mean_tokens = tokens / len(batches) if batches else 0.0
        flops = 3 * per_token * mean_tokens * steps + per_token * tokens * (params.rounds + 1)
        return Cost(state_bytes=copies * weights + masks + BATCH_BYTES_PER_TOKEN * tokens,
                    transient_bytes=max(backward, pruning), finalize_bytes=offloaded_bytes(view),
                    result_bytes=masks // 3, flops=float(flops))

    @classmethod
    def own_passes(cls, params: ImpParams, view: ModelView, shape: RunShape) -> dict[str, int]:
        """Every SGD step is one forward and backward, ``replay_backward`` = K + n (K - r); the loss
        after each of the n + 1 trainings, one forward per batch cycled: ``replay_forward`` =
        (n + 1) x min(K, batches with a loss target). None without such a batch (skipped)."""
        used = len(train_batch_shapes(view, shape, params.steps))
        if used == 0:
            return {}
        return {"replay_backward": params.steps + params.rounds * (params.steps - params.rewind_step),
                "replay_forward": (params.rounds + 1) * used}

    @classmethod
    def ladder(cls, params: ImpParams, view: ModelView, shape: RunShape) -> Sequence[Rung]:
        """Rewinding to the given weights (no rewind copy), then SGD without momentum (no buffer).
        Fewer rounds or steps save time, not memory, so they are parameters, not rungs."""
        rewound = params.model_copy(update={"rewind_step": 0})
        plain = rewound.model_copy(update={"momentum": 0.0})
        return cls.cheaper_rungs(params, view, shape, [
            Rung("rewind_to_init", rewound, "a different experiment, not an approximation: tickets rewound to the "
                                            "given weights (Frankle & Carbin 2019) instead of step r; Frankle et al. "
                                            "2020 find late rewinding needed for stable tickets in larger networks"),
            Rung("plain_sgd", plain, "also SGD without momentum at the same lr: another optimiser, so the "
                                     "tickets and losses differ (equal only at lr = 0)")])

    def setup(self) -> None:
        #: the batches the training cycles (the first ``steps`` with a loss target)
        self.batches: list[tuple[Batch, LossTargets]] = []
        #: the model-sized tensors of the pruning: weights, grads, momentum, rewind, the three masks
        self.held: dict[str, Any] = {}
        #: the model the copy trains through, while finalize runs (``trainable_model``)
        self.model: OneDeviceModel | None = None

    def update(self, step: Step) -> None:
        if len(self.batches) < self.params.steps and step.targets.n_targets > 0:
            self.batches.append((step.batch, step.targets))

    def finalize(self) -> dict[str, Any]:
        if not self.batches:
            raise NotApplicable("no batch had a loss target, so there is nothing to train on",
                                "give data with at least two tokens per sequence (causal) or a mask token "
                                "(masked LM)")
        p, held = self.params, self.held
        self.model = trainable_model(self.view)  # a dispatched model's weights loaded onto one device
        theta = self.model.weights
        names = [n for n in prunable(self.view, p.include_embeddings) if n in theta]
        if not names:
            raise NotApplicable(f"{self.view.name} has no trainable weight matrix to prune inside its blocks",
                                "set include_embeddings=True to prune the embeddings")
        held["weights"] = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
        held["mask"] = {n: torch.ones_like(theta[n], dtype=torch.bool) for n in names}
        self._train(0)
        rewind = held.get("rewind", theta)
        losses, sparsities = [self._loss()], [0.0]
        overlaps: dict[str, list[float]] = {k: [] for k in ("jaccard_previous", "dice_previous",
                                                            "jaccard_one_shot", "dice_one_shot")}
        for _ in range(p.rounds):
            held["previous"] = held["mask"]
            held.pop("one_shot", None)  # three masks at a time: this round's, the previous, the one-shot one
            trained = {n: held["weights"][n].detach() for n in names}
            held["mask"] = prune_survivors(trained, held["previous"], p.prune_fraction, p.scope)
            held["one_shot"] = one_shot_masks({n: theta[n] for n in names}, held["mask"], p.scope)
            for label, other in (("previous", held["previous"]), ("one_shot", held["one_shot"])):
                overlaps[f"jaccard_{label}"].append(jaccard(held["mask"], other))
                overlaps[f"dice_{label}"].append(dice(held["mask"], other))
            sparsities.append(sparsity(held["mask"]))
            self._rewind(rewind)
            self._train(p.rewind_step)
            losses.append(self._loss())
        out: dict[str, Any] = {
            "sparsity": SeriesValue(values=sparsities, index_name="round"),
            "loss": SeriesValue(values=losses, index_name="round"),
            **{k: SeriesValue(values=v, index_name="round (1..n)") for k, v in overlaps.items()},
            "final_sparsity": ScalarValue(value=sparsities[-1]),
            "final_loss": ScalarValue(value=losses[-1], unit="nats"),
            "steps_trained": ScalarValue(value=float(p.steps + p.rounds * (p.steps - p.rewind_step))),
            "train_batches": ScalarValue(value=float(len(self.batches)))}
        out.update({f"ticket/{n}": m for n, m in held["mask"].items()})
        self.model = None
        return out

    def _train(self, start: int) -> None:
        """SGD steps ``start``..K-1 on the held weights, the pruned entries' gradients zeroed; the
        first training (start 0) keeps the weights after r steps as the rewind point."""
        p, held = self.params, self.held
        weights, masks = held["weights"], held["mask"]
        # the previous training's gradients and momentum go before this one makes its own
        held.pop("grads", None)
        held.pop("momentum", None)
        opt = torch.optim.SGD(list(weights.values()), lr=p.lr, momentum=p.momentum)
        for k in range(start, p.steps):
            if start == 0 and k == p.rewind_step and k > 0:
                held["rewind"] = {n: w.detach().clone() for n, w in weights.items()}
            batch, targets = self.batches[k % len(self.batches)]
            opt.zero_grad()  # freed, not zeroed: the backward then never holds old and new gradients at once
            batch_loss(self.view, batch, targets, weights, self.model).backward()
            with torch.no_grad():
                for name, mask in masks.items():
                    grad = weights[name].grad
                    if grad is not None:
                        grad.mul_(mask)
            opt.step()
        held["grads"] = [w.grad for w in weights.values() if w.grad is not None]
        held["momentum"] = [s["momentum_buffer"] for s in opt.state.values() if s.get("momentum_buffer") is not None]

    def _rewind(self, source: Mapping[str, torch.Tensor]) -> None:
        """The held weights back to ``source``, the pruned entries zero."""
        weights, masks = self.held["weights"], self.held["mask"]
        with torch.no_grad():
            for name, w in weights.items():
                w.copy_(source[name])
                if name in masks:
                    w.mul_(masks[name])

    def _loss(self) -> float:
        """Token-weighted loss of the held weights over the batches cycled."""
        total, count = 0.0, 0
        with torch.no_grad():
            for batch, targets in self.batches:
                n = targets.n_targets
                total += float(batch_loss(self.view, batch, targets, self.held["weights"], self.model)) * n
                count += n
        return total / count


class ImpOverlap(ModelSetMetric):
    """How much the final IMP tickets (``lottery.imp``'s ``ticket/<param>``) of the models share,
    in the order given (checkpoints: in training order): the Jaccard index |A and B| / |A or B|
    and the Dice coefficient 2 |A and B| / (|A| + |B|) of the kept entries, between every pair and
    between consecutive models. Identical tickets give 1; random tickets of keep fraction k give
    about k / (2 - k) (Jaccard) and k (Dice)."""

    reads_weights = False  # the members' lottery.imp results only
    name = "lottery.imp_overlap"
    min_models = 2  # a comparison: the core skips a smaller set with the fix
    version = "1"
    summary = "Jaccard and Dice overlap of the final IMP tickets across checkpoints"
    Params = NoParams
    requires_metrics = ("lottery.imp",)
    derived_from = ("lottery.imp",)
    fields = {"jaccard": "Jaccard index of the tickets of every pair of models, a tensor [models, models]",
              "dice": "Dice coefficient of every pair, a tensor [models, models]",
              "jaccard_consecutive": "Jaccard index of each model's ticket with the next's, in the order given",
              "dice_consecutive": "Dice coefficient of each model's ticket with the next's"}


    def compute_set(self, views: Mapping[str, ModelView],
                    results: Mapping[str, Mapping[str, MetricResult]]) -> dict[str, Any]:
        tickets = [self._ticket(results[n]["lottery.imp"]) for n in results]
        names = list(results)
        first = set(tickets[0])
        for name, ticket in zip(names[1:], tickets[1:], strict=True):
            if set(ticket) != first:
                raise ValueError(f"the tickets of {names[0]} and {name} cover different parameters; compare "
                                 "checkpoints of one architecture run with the same include_embeddings")
        pair_j = torch.tensor([[jaccard(a, b) for b in tickets] for a in tickets], dtype=torch.float64)
        pair_d = torch.tensor([[dice(a, b) for b in tickets] for a in tickets], dtype=torch.float64)
        steps = range(len(tickets) - 1)
        return {"jaccard": pair_j, "dice": pair_d,
                "jaccard_consecutive": SeriesValue(values=[float(pair_j[i, i + 1]) for i in steps],
                                                   index_name="checkpoint"),
                "dice_consecutive": SeriesValue(values=[float(pair_d[i, i + 1]) for i in steps],
                                                index_name="checkpoint")}

    def _ticket(self, result: MetricResult) -> Masks:
        prefix = "ticket/"
        return {k[len(prefix):]: self.tensor_of(result, k).bool() for k in result.values if k.startswith(prefix)}
