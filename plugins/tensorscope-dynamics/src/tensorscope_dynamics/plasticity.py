"""dynamics.plasticity: can the model still learn? A trainability probe on a copy of its
weights, against a fresh initialisation, plus dormant units and feature rank."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    LayerValue,
    Metric,
    ModelView,
    OneDeviceModel,
    Params,
    RunShape,
    ScalarValue,
    Step,
    TextValue,
    act_bytes,
    batch_logits,
    offloaded_bytes,
    recorded_blocks,
    resumed_at,
)

from .features import dormant_mask, srank
from .probe import probe_labels, trainability


class PlasticityParams(Params):
    k_steps: int = Field(10, ge=1, description="SGD steps K of the trainability probe")
    lr: float = Field(0.05, gt=0.0, description="the probe's fixed SGD learning rate")
    per_block: bool = Field(True, description="also probe each block's MLP units alone (unit_plasticity)")
    fresh: bool = Field(
        True,
        description="also probe a fresh initialisation of the same architecture, seeded "
        "with the run's seed (Hugging Face models: built from their config)",
    )
    tau: float = Field(0.025, ge=0.0, description="a unit is dormant when E|h_i| / mean_k E|h_k| <= tau")
    delta: float = Field(0.01, gt=0.0, lt=1.0, description="srank_delta threshold")
    srank_tokens: int = Field(
        256,
        ge=2,
        description="real tokens (from the first batches) whose resid features give srank; memory grows with it",
    )


def fresh_buildable(view: ModelView) -> bool:
    """A fresh initialisation needs a Hugging Face model (its class built from its config)."""
    return getattr(view.model, "config", None) is not None and hasattr(type(view.model), "config_class")


def _probes(params: PlasticityParams, view: ModelView) -> int:
    return 1 + int(params.fresh and fresh_buildable(view)) + (view.n_layers if params.per_block else 0)


class Plasticity(Metric):
    """Plasticity (Lyle et al. 2023; Dohare et al. 2024), on the first batch of the run:

    - ``plasticity`` P = 1 - L_K / L_0: the drop of the cross-entropy on a fixed probe task
      (uniform random labels, seeded, at the run's target positions) after K plain SGD steps of
      learning rate ``lr`` on every parameter, trained on a copy of the weights (the model is
      never written); ``fresh_plasticity`` the same from a fresh initialisation of the
      architecture seeded with the run's seed, ``relative_plasticity`` their ratio;
    - ``unit_plasticity`` per block: P when only that block's MLP output weights (the hidden
      units' outgoing weights) are trained: 0 exactly when every unit is dead (h = 0 gives a
      zero gradient);
    - ``dormant_fraction`` per block: MLP units with s_i = E|h_i| / mean_k E|h_k| <= tau (Sokar
      et al. 2023) over the run's real tokens; a block whose units are all silent is all dormant;
    - ``srank`` per resid entry: srank_delta (Kumar et al. 2021) of the [tokens, d_model]
      features of the first ``srank_tokens`` real tokens (not the Roy-Vetterli effective rank).

    Each probe is K forward+backward passes and one forward (``replay_backward`` / ``replay_forward``);
    the per-block probes' passes resume at their block from one recorded forward of the batch.
    """

    name = "dynamics.plasticity"
    version = "1"
    summary = "trainability probe (1 - L_K/L_0) vs a fresh init, dormant units, srank"
    Params = PlasticityParams
    artifacts = ("mlp_hidden", "resid")
    supports_dispatch = True  # its probes run on OneDeviceModel (every weight loaded), resumed on its copy's view
    fields = {
        "plasticity": "1 - L_K/L_0 on the probe task",
        "fresh_plasticity": "the same, fresh initialisation",
        "relative_plasticity": "plasticity / fresh_plasticity",
        "probe_loss_start": "L_0 (nats)",
        "probe_loss_end": "L_K (nats)",
        "unit_plasticity": "P training one block's MLP output weights only",
        "dormant_fraction": "fraction of dormant MLP units per block",
        "dormant_units": "dormant units in all",
        "srank": "srank_delta of the resid features per entry",
        "note": "what was not computed, and why",
    }

    @classmethod
    def own_passes(cls, params: PlasticityParams, view: ModelView, shape: RunShape) -> dict[str, int]:
        if shape.n_batches == 0:
            return {}
        probes = _probes(params, view)
        # with per_block, one more forward records the blocks' outputs the per-block probes resume from
        return {"replay_backward": probes * params.k_steps, "replay_forward": probes + params.per_block}

    @classmethod
    def cost(cls, params: PlasticityParams, view: ModelView, shape: RunShape) -> Cost:
        tokens = min(params.srank_tokens, shape.batch_size * shape.seq_len * max(shape.n_batches, 1))
        features = (view.n_layers + 1) * tokens * view.d_model * 4
        # the probe: a trained copy of the weights, its gradients (a tied embedding's two beside their sum),
        # the step's ``lr * grad`` of the largest weight, one batch's backward and, on a dispatched model, every
        # weight loaded onto the input device; with ``fresh``, the freshly built model beside them
        largest = max((p.numel() * p.element_size() for p in view.model.parameters()), default=0)
        probe = 2 * view.every_param_bytes + 2 * view.tied_embedding_bytes + largest + offloaded_bytes(view) + \
            act_bytes(view, shape.batch_size, shape.seq_len)
        fresh = view.every_param_bytes if params.fresh and fresh_buildable(view) else 0
        # with per_block, the blocks' recorded outputs the per-block probes resume from
        recorded = view.n_layers * shape.batch_size * shape.seq_len * view.d_model * view.dtype_bytes \
            if params.per_block else 0
        return Cost(state_bytes=view.n_layers * view.d_mlp * 8 + 8 + features + 8 * (view.n_layers + 5),
                    transient_bytes=probe + max(fresh, recorded))

    def setup(self) -> None:
        self.abs_sums = torch.zeros(self.view.n_layers, self.view.d_mlp, dtype=torch.float64)
        self.tokens = torch.zeros((), dtype=torch.float64)
        tokens = min(self.params.srank_tokens, self.shape.batch_size * self.shape.seq_len * self.shape.n_batches)
        self.features = torch.zeros(self.view.n_layers + 1, tokens, self.view.d_model, dtype=torch.float32)
        self.kept = 0
        self.probe = torch.full((self.view.n_layers + 4,), float("nan"), dtype=torch.float64)
        self.probed = False

    def update(self, step: Step) -> None:
        real = step.batch.attention_mask.bool()
        for layer, hidden in enumerate(step["mlp_hidden"]):
            self.abs_sums[layer] += hidden[real.to(hidden.device)].double().abs().sum(0).cpu()
        self.tokens += real.sum()
        room = self.features.shape[1] - self.kept
        if room > 0:
            for entry, acts in enumerate(step["resid"]):
                rows = acts[real.to(acts.device)][:room].float().cpu()
                self.features[entry, self.kept : self.kept + len(rows)] = rows
            self.kept += min(room, int(real.sum()))
        if not self.probed:
            self._run_probes(step)
            self.probed = True

    def _run_probes(self, step: Step) -> None:
        view, p = self.view, self.params
        labels = probe_labels(step.targets, view.vocab_size, self.shape.seed)
        # every weight (a dispatched model's loaded onto the input device), run without capture hooks
        model = OneDeviceModel(view, [n for n, _ in view.named_parameters()])
        own = model.weights
        trainable = [n for n, t in view.named_parameters() if t.requires_grad]

        def plasticity(start: dict[str, torch.Tensor], trained: list[str]) -> tuple[float, float, float]:
            first, last = trainability(view, model, step.batch, step.targets, labels, start, trained, p.k_steps,
                                       p.lr)
            return 1.0 - last / first, first, last

        value, first, last = plasticity(own, trainable)
        self.probe[:3] = torch.tensor([value, first, last])
        if p.fresh and fresh_buildable(view):
            self.probe[3] = plasticity(self._fresh_weights(own), trainable)[0]
        if p.per_block:
            # training block l's MLP output weights changes nothing before block l: its probe's forwards
            # resume there from one recorded forward of the batch at the model's own weights
            with recorded_blocks(model.view) as outputs, torch.no_grad():
                batch_logits(view, step.batch, step.targets, model=model)
            name_of = {id(module): name for name, module in view.model.named_modules()}
            for layer, module in enumerate(view.mlp_out):
                with resumed_at(model.view, layer, outputs):
                    self.probe[4 + layer] = plasticity(own, [f"{name_of[id(module)]}.weight"])[0]

    def _fresh_weights(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The architecture's own initialisation, seeded with the run's seed (global RNG restored), on the
        device and in the dtype of ``like`` (the weights it stands beside)."""
        model = self.view.model
        first = next(iter(like.values()))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.shape.seed)
            fresh = type(model)(model.config)
        return {n: t.detach().to(first.device, first.dtype) for n, t in fresh.named_parameters() if n in like}

    def finalize(self) -> dict[str, Any]:
        if not self.probed or float(self.tokens) == 0:
            raise ValueError("no batches: plasticity needs data")
        notes = []
        dormant = dormant_mask(self.abs_sums / self.tokens, self.params.tau)
        out: dict[str, Any] = {
            "plasticity": ScalarValue(value=float(self.probe[0])),
            "probe_loss_start": ScalarValue(value=float(self.probe[1]), unit="nats"),
            "probe_loss_end": ScalarValue(value=float(self.probe[2]), unit="nats"),
            "dormant_fraction": LayerValue(values=dormant.double().mean(-1).tolist(), axis="block"),
            "dormant_units": ScalarValue(value=int(dormant.sum())),
        }
        if not bool(self.probe[3].isnan()):
            out["fresh_plasticity"] = ScalarValue(value=float(self.probe[3]))
            out["relative_plasticity"] = ScalarValue(value=float(self.probe[0] / self.probe[3]))
        else:
            notes.append("no fresh initialisation (fresh=False, or not a Hugging Face model)")
        if self.params.per_block:
            out["unit_plasticity"] = LayerValue(values=self.probe[4:].tolist(), axis="block")
        if self.kept >= 2:
            out["srank"] = LayerValue(
                values=[float(srank(f[: self.kept], self.params.delta)) for f in self.features], axis="resid"
            )
        else:
            notes.append(f"srank needs at least 2 real tokens, got {self.kept}")
        if notes:
            out["note"] = TextValue(text="; ".join(notes))
        return out
