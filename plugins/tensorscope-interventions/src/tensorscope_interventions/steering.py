"""interventions.steering: contrastive activation-addition steering vectors per residual position."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    BadParameterError,
    Batch,
    Cost,
    LayerValue,
    LossTargets,
    Metric,
    ModelView,
    NotApplicable,
    Params,
    PreparedData,
    RunShape,
    ScalarValue,
    Step,
    TextValue,
    batch_logits,
    forward_act_bytes,
    hook_free_view,
)

from .hooks import added_to_resid
from .tasks import data_tasks, has_loss_target, pick_tasks, target_batches

#: kept per token of each negative batch: model input, target ids, target mask, attention mask (int64)
KEPT_BYTES_PER_TOKEN = 4 * 8


class SteeringParams(Params):
    positive: str | None = Field(None, description="task x+ (default: the run's first task)")
    negative: str | None = Field(None, description="task x- (default: the run's second task)")
    alpha: float = Field(1.0, description="the vector added is alpha x v_l")
    layers: list[int] | None = Field(
        None, description="residual positions 0..n_layers to steer at (None: every block input 0..n_layers-1)"
    )
    skip_first: bool = Field(True, description="leave position 0 of each sequence out of the means")
    token_ids: list[int] | None = Field(
        None, min_length=2, max_length=2, description="[a, b]: also report the mean logit difference logit_a - logit_b"
    )


class Steering(Metric):
    """Steering vectors by contrastive activation addition (CAA, Rimsky et al. 2024; ActAdd, Turner et
    al. 2023): v_l = mean h_l(x+) - mean h_l(x-), the means over every real (non-pad) token of the two
    tasks' sequences, position 0 left out (``skip_first``: the first position carries an outsized
    attention-sink representation in most models), with h_l the residual stream at position l of the
    core's ``resid`` artifact (entering block l; l = n_layers leaves the last block). Then, on the x-
    sequences, the change of the token-mean loss over the run's targets (and, with ``token_ids`` [a, b],
    of the mean over target positions of logit_a - logit_b) when alpha v_l is added to the residual
    stream at l at every token, one position at a time (hooks on the hook-free copy, so the capture
    never sees them). ``best_layer``: the position with the largest loss decrease (the most negative
    ``loss_change``; with alpha > 0 the vector points from x- to x+, so the loss on x- usually rises);
    ``best_layer_logit_diff``: the largest increase of the logit difference.
    """

    name = "interventions.steering"
    supports_dispatch = True  # its replays go through the model's own forward, accelerate's hooks included
    version = "1"
    summary = "CAA steering vectors per layer from two tasks, and the loss / logit-difference change they cause"
    Params = SteeringParams
    artifacts = ("resid",)
    fields = {
        "layers": "the residual positions steered at",
        "vector_norm": "|v_l| per position (axis resid)",
        "loss_base": "token-mean loss on x- without steering (nats)",
        "loss_change": "loss on x- with alpha v_l added at l, minus loss_base, per position",
        "logit_diff_base": "mean logit_a - logit_b over x-'s target positions (token_ids)",
        "logit_diff_change": "its change with alpha v_l added, per position (token_ids)",
        "best_layer": "position with the most negative loss_change",
        "best_layer_logit_diff": "position with the largest logit_diff_change (token_ids)",
        "vectors": "[len(layers), d_model] the steering vectors v_l, float32",
        "tasks": "x+ and x-",
    }

    @classmethod
    def skip_reason(cls, params: SteeringParams, view: ModelView, data: PreparedData | None) -> str | None:
        chosen = pick_tasks(params.positive, params.negative, data_tasks(data))
        return chosen if isinstance(chosen, str) else None

    @classmethod
    def positions(cls, params: SteeringParams, view: ModelView) -> list[int]:
        """The residual positions steered at; BadParameterError for one the model does not have."""
        layers = list(range(view.n_layers)) if params.layers is None else params.layers
        bad = [x for x in layers if not 0 <= x <= view.n_layers]
        if bad or not layers:
            raise BadParameterError(
                f"layers {bad or '[]'} are not residual positions of {view.name} (0..{view.n_layers})",
                f"pick layers from 0..{view.n_layers}, or None",
            )
        if params.token_ids is not None and not all(0 <= t < view.vocab_size for t in params.token_ids):
            raise BadParameterError(
                f"token_ids {params.token_ids} are outside the vocabulary 0..{view.vocab_size - 1}",
                "pick two token ids of the model's vocabulary",
            )
        return sorted(set(layers))

    @classmethod
    def own_passes(cls, params: SteeringParams, view: ModelView, shape: RunShape) -> dict[str, int]:
        """One forward per x- batch with a loss target unsteered and one per steered position:
        ``(1 + len(layers)) x batches``."""
        chosen = pick_tasks(params.positive, params.negative, list(shape.tasks))
        if isinstance(chosen, str):
            return {}
        return {"replay_forward": (1 + len(cls.positions(params, view))) * target_batches(view, shape, chosen[1])}

    @classmethod
    def cost(cls, params: SteeringParams, view: ModelView, shape: RunShape) -> Cost:
        """Two float64 sums [n_layers + 1, d_model] and their token counts, and the x- batches kept for
        the replays (model input, targets, target mask, attention mask: 32 bytes a token). Finalize replays
        a kept batch at a time: the forward, then its logits in float64, the target rows picked from them
        and cross-entropy's log-softmax of those (three [tokens, V] float64 blocks at most)."""
        chosen = pick_tasks(params.positive, params.negative, list(shape.tasks))
        tokens = (
            0
            if isinstance(chosen, str)
            else sum(
                rows * length
                for rows, length, task in shape.batches
                if task == chosen[1] and has_loss_target(view, length)
            )
        )
        rows, seq = shape.batch_size, shape.seq_len
        replay = forward_act_bytes(view, rows, seq, loss=False) + 3 * 8 * rows * seq * view.vocab_size
        return Cost(state_bytes=2 * 8 * (view.n_layers + 1) * (view.d_model + 1) + KEPT_BYTES_PER_TOKEN * tokens,
                    finalize_bytes=replay if tokens else 0)

    def setup(self) -> None:
        chosen = pick_tasks(self.params.positive, self.params.negative, list(self.shape.tasks))
        assert not isinstance(chosen, str)
        self.plus, self.minus = chosen
        self.layers = self.positions(self.params, self.view)
        n, d = self.view.n_layers + 1, self.view.d_model
        self.sums = torch.zeros(2, n, d, dtype=torch.float64)  # [x+, x-]
        self.counts = torch.zeros(2, n, 1, dtype=torch.float64)
        self.kept: list[tuple[torch.Tensor, ...]] = []

    def update(self, step: Step) -> None:
        if step.task not in (self.plus, self.minus):
            return
        side = 0 if step.task == self.plus else 1
        real = step.batch.attention_mask.bool().clone()
        if self.params.skip_first:
            real[:, 0] = False
        for layer, hidden in enumerate(step["resid"]):
            self.sums[side, layer] += hidden[real].double().sum(dim=0).cpu()
            self.counts[side, layer] += float(real.sum())
        t = step.targets
        if side == 1 and t.n_targets > 0:
            self.kept.append(
                tuple(
                    x.detach().cpu().clone()
                    for x in (t.model_input, t.target_ids, t.target_mask, step.batch.attention_mask)
                )
            )

    def _scores(self, device: torch.device) -> tuple[float, float]:
        """(token-mean loss, mean logit_a - logit_b) over the kept x- batches, through the hook-free copy
        (whose blocks are ``hook_free_view``'s: the steering hook, when one is on, fires)."""
        loss = diff = tokens = 0.0
        for model_input, target_ids, target_mask, attention in self.kept:
            targets = LossTargets(model_input.to(device), target_ids.to(device), target_mask.to(device))
            batch = Batch(targets.model_input, attention.to(device), self.minus, 0)
            with torch.no_grad():
                logits = batch_logits(self.view, batch, targets).double()
            mask = targets.target_mask.bool()
            chosen = logits[mask]
            loss += float(torch.nn.functional.cross_entropy(chosen, targets.target_ids[mask], reduction="sum"))
            if self.params.token_ids is not None:
                a, b = self.params.token_ids
                diff += float((chosen[:, a] - chosen[:, b]).sum())
            tokens += float(mask.sum())
        return loss / tokens, diff / tokens

    def finalize(self) -> dict[str, Any]:
        if (self.counts[:, self.layers] == 0).any():
            raise NotApplicable(
                f"task {self.plus!r} or {self.minus!r} has no token to average",
                "give both tasks sequences of at least two tokens (skip_first leaves out the first)",
            )
        if not self.kept:
            raise NotApplicable(f"task {self.minus!r} has no loss target", "give it sequences of at least two tokens")
        means = self.sums / self.counts
        vectors = (means[0] - means[1])[self.layers]
        twin = hook_free_view(self.view)
        device = self.view.input_device
        base_loss, base_diff = self._scores(device)
        loss_change, diff_change = [], []
        for layer, v in zip(self.layers, vectors, strict=True):
            with added_to_resid(twin, layer, self.params.alpha * v):
                loss, diff = self._scores(device)
            loss_change.append(loss - base_loss)
            diff_change.append(diff - base_diff)
        self.kept = []
        labels = [str(x) for x in self.layers]
        out: dict[str, Any] = {
            "layers": [float(x) for x in self.layers],
            "vector_norm": LayerValue(values=vectors.norm(dim=1).tolist(), labels=labels, axis="resid"),
            "loss_base": ScalarValue(value=base_loss, unit="nats"),
            "loss_change": LayerValue(values=loss_change, labels=labels, axis="resid"),
            "best_layer": ScalarValue(value=float(self.layers[min(range(len(labels)), key=loss_change.__getitem__)])),
            "vectors": vectors.float(),
            "tasks": TextValue(text=f"x+ = {self.plus}, x- = {self.minus}"),
        }
        if self.params.token_ids is not None:
            out["logit_diff_base"] = ScalarValue(value=base_diff)
            out["logit_diff_change"] = LayerValue(values=diff_change, labels=labels, axis="resid")
            best = max(range(len(labels)), key=diff_change.__getitem__)
            out["best_layer_logit_diff"] = ScalarValue(value=float(self.layers[best]))
        return out
