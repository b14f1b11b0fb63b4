"""circuits.ablation: how much the loss needs each attention head and each MLP."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    HeadValue,
    LayerValue,
    Metric,
    ModelView,
    Params,
    PreparedData,
    RunShape,
    ScalarValue,
    Step,
    TableValue,
    bootstrap_ratio_ci,
    recorded_blocks,
    resumed_at,
)

from .interventions import Edit, edit_heads, edit_mlp, head_attn_out_reason, hooked, logits_of, token_ce

Mode = Literal["zero", "mean"]
Component = tuple[str, int, int | None]  # ("head", layer, head) or ("mlp", layer, None)
Batches = Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


class AblationParams(Params):
    modes: tuple[Mode, ...] = Field(("zero", "mean"), min_length=1, description="'zero' and/or 'mean' ablation")
    heads: bool = Field(True, description="ablate every attention head")
    mlps: bool = Field(True, description="ablate every MLP")


class Ablation(Metric):
    """Causal necessity: the change in loss when one component's output is replaced, with
    everything else left as it is. Components: each attention head (its output entering the
    attention output projection, ``ModelView.attn_out``: head h's d_head slice, so the head
    adds nothing (zero) or a constant (mean) to the residual stream through W_O[h]) and each MLP
    (the output of ``ModelView.mlp_out``, the MLP's contribution to the residual stream).

    ``zero``: the output is set to 0. ``mean``: to its mean over every real token of the run's
    data (one vector per component, the same at every position), so the component carries no
    information about the input but keeps its average effect. The change is
    ``sum_seq (ablated - clean token-loss sum) / sum_seq targets``, in nats per target token (the
    loss of ``basic.loss``: next tokens, or an encoder's seeded masked tokens), positive when
    the model needs the component; the 95% CI is a percentile bootstrap over sequences.

    The token ids of the run are kept (small) and the ablations run in ``finalize``: the mean
    needs one pass over all the data before any mean-ablated forward. One forward per batch
    per component and mode, resumed at the component's block from a recorded clean forward of
    the batch (``recorded_blocks`` / ``resumed_at``): the blocks before it are not recomputed.
    """

    name = "circuits.ablation"
    supports_dispatch = True  # replays whole forwards through the model's own (dispatching) hooks
    version = "1"
    summary = "change in loss when each head or MLP is zero- or mean-ablated, with CIs over sequences"
    Params = AblationParams
    artifacts = ("token_loss",)
    fields = {"head_zero": "per layer x head: loss change when the head's output is zeroed (nats/token)",
              "head_mean": "per layer x head: loss change when the head's output is its data mean",
              "mlp_zero": "per layer: loss change when the MLP's output is zeroed",
              "mlp_mean": "per layer: loss change when the MLP's output is its data mean",
              "clean_loss": "the loss without ablation (nats/token)",
              "table": "component, layer, head, mode, delta_loss, ci_low, ci_high"}

    @classmethod
    def skip_reason(cls, params: AblationParams, view: ModelView, data: PreparedData | None) -> str | None:
        if not (params.heads or params.mlps):
            return "nothing to ablate: heads and mlps are both off"
        reason = head_attn_out_reason(view) if params.heads else None
        return None if reason is None else f"{reason} (or set heads=False to ablate only the MLPs)"

    @classmethod
    def cost(cls, params: AblationParams, view: ModelView, shape: RunShape) -> Cost:
        n, t = shape.n_sequences, shape.seq_len
        components = view.n_layers * (view.n_heads * params.heads + params.mlps)
        ablated = components * len(params.modes)
        forwards = ablated + ("mean" in params.modes) + 1
        recorded = view.n_layers * shape.batch_size * t * view.d_model * view.dtype_bytes  # one batch's blocks
        # the ablated forwards resume at their component's block: about half the blocks each
        return Cost(state_bytes=8 * (4 * n * t + 2 * n), finalize_bytes=recorded,
                    flops=2.0 * view.n_params * n * t * (forwards - ablated / 2))

    @classmethod
    def own_passes(cls, params: AblationParams, view: ModelView, shape: RunShape) -> dict[str, int]:
        """In ``finalize``, per batch of the run: one clean forward that records the blocks' outputs,
        one forward per component and mode (modes counted as listed; each resumes at the component's
        block), plus one that collects the means when a mode is ``mean``. Planned count: a run whose
        data hold no loss target at all fails before any of them."""
        components = view.n_layers * (view.n_heads * params.heads + params.mlps)
        forwards = components * len(params.modes) + ("mean" in params.modes) + 1
        return {"replay_forward": len(shape.batches) * forwards}

    def setup(self) -> None:
        n = self.shape.n_sequences
        self.batches: list[torch.Tensor] = []  # [4, batch, seq]: model input, attention mask, targets, target mask
        self.clean = torch.zeros(n, dtype=torch.float64)
        self.tokens = torch.zeros(n, dtype=torch.float64)
        self.filled = 0

    def update(self, step: Step) -> None:
        targets = step.targets
        self.batches.append(torch.stack([targets.model_input, step.batch.attention_mask, targets.target_ids,
                                         step.target_mask]).cpu())
        rows = slice(self.filled, self.filled + step.batch.input_ids.shape[0])
        self.clean[rows] = (step["token_loss"].double() * step.target_mask).sum(1).cpu()
        self.tokens[rows] = step.target_mask.sum(1).double().cpu()
        self.filled = rows.stop

    # -- the ablations -------------------------------------------------------------------
    def _data(self) -> Batches:
        device = self.view.input_device
        for stacked in self.batches:
            ids, mask, target_ids, target_mask = stacked.to(device)
            yield ids, mask, target_ids, target_mask

    def _components(self) -> list[Component]:
        heads: list[Component] = [("head", layer, h) for layer in range(self.view.n_layers)
                                  for h in range(self.view.n_heads)]
        mlps: list[Component] = [("mlp", layer, None) for layer in range(self.view.n_layers)]
        return (heads if self.params.heads else []) + (mlps if self.params.mlps else [])

    def _hook(self, component: Component, edit: Edit) -> Any:
        kind, layer, _ = component
        if kind == "head":
            return edit_heads(self.view, layer, edit)
        return edit_mlp(self.view, layer, edit)

    def _means(self) -> dict[tuple[str, int], torch.Tensor]:
        """Mean over all real tokens of each layer's head outputs [n_heads, d_head] and MLP output [d_model]."""
        sums: dict[tuple[str, int], torch.Tensor] = {}
        count = 0
        keys = {(kind, layer) for kind, layer, _ in self._components()}
        for ids, mask, _, _ in self._data():
            real = mask.bool()

            def accumulate(key: tuple[str, int], real: torch.Tensor = real) -> Edit:
                def add(x: torch.Tensor) -> torch.Tensor:
                    sums[key] = sums.get(key, 0) + x[real].double().sum(0)
                    return x
                return add

            with hooked([self._hook((kind, layer, None), accumulate((kind, layer))) for kind, layer in keys]), \
                    torch.no_grad():
                logits_of(self.view, ids, mask)
            count += int(real.sum())
        return {key: (total / count) for key, total in sums.items()}

    def _ablate(self, component: Component, mode: Mode, means: dict[tuple[str, int], torch.Tensor]) -> Edit:
        kind, layer, head = component
        mean = means.get((kind, layer))

        def replace(x: torch.Tensor) -> torch.Tensor:
            if kind == "mlp":
                return torch.zeros_like(x) if mode == "zero" else mean.to(x).expand_as(x)  # type: ignore[union-attr]
            x = x.clone()
            x[..., head, :] = 0 if mode == "zero" else mean[head].to(x)  # type: ignore[index]
            return x
        return replace

    def _ablated_sums(self, means: dict[tuple[str, int], torch.Tensor]) -> dict[tuple[Mode, Component], torch.Tensor]:
        """Per-sequence token-loss sums, in data order, with each component ablated in each mode.

        Batch by batch: one clean forward records every block's output, then each ablated forward
        resumes at its component's block (the blocks before it compute what they computed clean)."""
        sums: dict[tuple[Mode, Component], list[torch.Tensor]] = {
            (mode, component): [] for mode in self.params.modes for component in self._components()}
        for ids, mask, target_ids, target_mask in self._data():
            with recorded_blocks(self.view) as outputs, torch.no_grad():
                logits_of(self.view, ids, mask)
            for (mode, component), parts in sums.items():
                edit = self._hook(component, self._ablate(component, mode, means))
                with resumed_at(self.view, component[1], outputs), hooked([edit]), torch.no_grad():
                    logits = logits_of(self.view, ids, mask)
                parts.append(token_ce(logits, target_ids, target_mask).double().sum(1).cpu())
            del outputs
        return {key: torch.cat(parts) for key, parts in sums.items()}

    def finalize(self) -> dict[str, Any]:
        used = self.tokens[:self.filled] > 0
        if not bool(used.any()):
            raise ValueError("the data hold no loss targets: nothing to measure the loss change on")
        clean, tokens = self.clean[:self.filled], self.tokens[:self.filled]
        means = self._means() if "mean" in self.params.modes else {}
        L, H = self.view.n_layers, self.view.n_heads
        grids = {mode: torch.full((L, H), float("nan"), dtype=torch.float64) for mode in self.params.modes}
        layers = {mode: torch.full((L,), float("nan"), dtype=torch.float64) for mode in self.params.modes}
        rows = []
        for (mode, component), ablated in self._ablated_sums(means).items():
            delta = ablated - clean
            value = float(delta[used].sum() / tokens[used].sum())
            low, high = bootstrap_ratio_ci(delta[used].numpy(), tokens[used].numpy(), seed=self.shape.seed)
            kind, layer, head = component
            if head is None:
                layers[mode][layer] = value
            else:
                grids[mode][layer, head] = value
            rows.append([kind, layer, head, mode, value, low, high])
        out: dict[str, Any] = {"clean_loss": ScalarValue(value=float(clean[used].sum() / tokens[used].sum()),
                                                         n=int(tokens[used].sum()), unit="nats/token"),
                               "table": TableValue(columns=["component", "layer", "head", "mode", "delta_loss",
                                                            "ci_low", "ci_high"], rows=rows)}
        for mode in self.params.modes:
            if self.params.heads:
                out[f"head_{mode}"] = HeadValue(values=grids[mode].tolist())
            if self.params.mlps:
                out[f"mlp_{mode}"] = LayerValue(values=layers[mode].tolist(), axis="block")
        return out
