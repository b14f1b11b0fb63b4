"""dynamics.signal_propagation: how each block scales perturbations (chi), how isometric its
Jacobian is, and whether token representations collapse onto one direction."""

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
    PreparedData,
    RunShape,
    ScalarValue,
    Step,
    TextValue,
    block_saved_bytes,
    offloaded_bytes,
)

from .collapse import collapse_stats
from .jacobians import BlockFn, block_functions, hutchinson_sums, local_jacobian


class SignalParams(Params):
    n_probes: int = Field(8, ge=1, description="Rademacher probes per block and probed batch (Hutchinson)")
    max_batches: int = Field(
        2,
        ge=1,
        description="batches on which the Jacobians are probed (one replay forward "
        "each); rank collapse uses every batch",
    )
    sv_tokens: int = Field(
        2,
        ge=0,
        description="tokens whose dense d x d block Jacobian gives the singular values (first probed batch); 0: none",
    )
    max_dense_dim: int = Field(
        1024, ge=1, description="no singular values above this d_model (d forward-mode products per token and block)"
    )
    chunk: int = Field(64, ge=1, description="input directions per vmapped forward-mode product")
    exclude_first: bool = Field(True, description="leave position 0 (attention sinks, [CLS]) out of every statistic")


class SignalPropagation(Metric):
    """Per block l, with J_l = d h_{l+1} / d h_l over the real tokens of a sequence (positions
    >= 1 with ``exclude_first``):

    - ``chi``: tr(J^T J) / dim = E|J v|^2 / |v|^2, by Hutchinson's estimator with Rademacher v
      through ``torch.func.jvp`` (h + 0: 1; h + alpha h: (1 + alpha)^2). Each block is called
      alone with the arguments the model passed it (its causal mask, rotary embeddings), which a
      pre-hook captures in one replay forward per probed batch;
    - ``sv_max``, ``sv_min``, ``sv_log_sd``: the singular values of the dense token-local
      Jacobian d h_{l+1}[t] / d h_l[t] (d x d, exact: d forward-mode products) on ``sv_tokens``
      tokens, averaged over them; ``sv_log_sd`` is the SD of log sigma (0 for an isometry: an
      orthogonal map has every sigma 1). Cross-token blocks of J are not included. Not computed
      above ``max_dense_dim``;
    - rank collapse per resid entry (Dong et al. 2021), from the shared forward: ``cosine``, the
      mean pairwise cosine of a sequence's tokens, and ``residual`` = |X - 1 xbar^T|_F / |X|_F,
      averaged over sequences with at least 2 kept tokens (identical tokens: 1 and 0).
    """

    name = "dynamics.signal_propagation"
    version = "1"
    summary = "per-block Jacobian gain chi (jvp Hutchinson), singular-value spread, rank collapse"
    Params = SignalParams
    artifacts = ("resid",)
    supports_dispatch = True  # its forwards and block calls run on OneDeviceModel (weights loaded per batch)
    fields = {
        "chi": "tr(J^T J)/dim per block",
        "sv_max": "largest singular value of the token-local Jacobian",
        "sv_min": "smallest",
        "sv_log_sd": "SD of log singular values (0: isometry)",
        "cosine": "mean pairwise token cosine per resid entry",
        "residual": "|X - 1 xbar^T| / |X| per entry",
        "n_probes": "Hutchinson probes per block",
        "note": "why the singular values are missing",
    }

    @classmethod
    def skip_reason(cls, params: SignalParams, view: ModelView, data: PreparedData | None) -> str | None:
        if data is not None and params.exclude_first and data.max_seq_len < 2:
            return "every sequence is a single token, and exclude_first leaves position 0 out: nothing to probe"
        return None

    @classmethod
    def own_passes(cls, params: SignalParams, view: ModelView, shape: RunShape) -> dict[str, int]:
        """One replay forward per probed batch, and one per token of the singular values (on that token's
        sequence alone; the planned count assumes the probed batches hold ``sv_tokens`` kept tokens)."""
        probed = min(params.max_batches, shape.n_batches)
        return {"replay_forward": probed + (cls._sv_tokens(params, view) if probed else 0)}

    @classmethod
    def _sv_tokens(cls, params: SignalParams, view: ModelView) -> int:
        return params.sv_tokens if view.d_model <= params.max_dense_dim else 0

    @classmethod
    def cost(cls, params: SignalParams, view: ModelView, shape: RunShape) -> Cost:
        sv = view.n_layers * cls._sv_tokens(params, view) * view.d_model * 8
        # a jvp carries a tangent beside the primal through one block (Hutchinson: the whole batch); the
        # dense Jacobian's vmap carries min(chunk, d) tangents at once through one sequence: in a causal
        # model only up to its token, and with right padding the first kept tokens sit at positions
        # < sv_tokens + exclude_first. Beside either, every block's input on those rows, kept by the
        # replay forward (``block_functions``), and on a dispatched model every weight loaded onto the
        # input device.
        sv_tokens = cls._sv_tokens(params, view)
        length = min(shape.seq_len, sv_tokens + params.exclude_first) if view.causal else shape.seq_len
        inputs = view.n_layers * view.d_model * view.dtype_bytes
        hutchinson = 2 * block_saved_bytes(view, shape.batch_size, shape.seq_len) \
            + inputs * shape.batch_size * shape.seq_len
        dense = (1 + min(params.chunk, view.d_model)) * block_saved_bytes(view, 1, length) + inputs * length \
            if sv_tokens else 0
        return Cost(
            state_bytes=2 * 8 * view.n_layers + 2 * 8 * (view.n_layers + 1) + sv,
            transient_bytes=max(hutchinson, dense) + offloaded_bytes(view),
            flops=2.0 * params.n_probes * min(params.max_batches, shape.n_batches) * view.param_bytes,
        )

    def setup(self) -> None:
        layers = self.view.n_layers
        self.chi_sums = torch.zeros(layers, 2, dtype=torch.float64)  # sum |Jv|^2, sum |v|^2
        self.collapse = torch.zeros(layers + 1, 2, dtype=torch.float64)  # sum cosine, sum residual
        self.sequences = 0
        self.svs = torch.zeros(layers, self._sv_tokens(self.params, self.view), self.view.d_model, dtype=torch.float64)
        self.sv_filled = 0
        self.probed = 0
        self.probes = 0

    def _kept(self, step: Step) -> torch.Tensor:
        keep = step.batch.attention_mask.bool().cpu().clone()
        if self.params.exclude_first:
            keep[:, 0] = False
        return keep

    def update(self, step: Step) -> None:
        keep = self._kept(step)
        self._collapse(step["resid"], keep)
        if self.probed < self.params.max_batches:
            self._probe(step, keep)
            self.probed += 1

    def _collapse(self, resid: list[torch.Tensor], keep: torch.Tensor) -> None:
        for row in range(keep.shape[0]):
            if int(keep[row].sum()) < 2:
                continue
            for layer, acts in enumerate(resid):
                self.collapse[layer] += torch.tensor(collapse_stats(acts[row][keep[row].to(acts.device)].cpu()))
            self.sequences += 1

    def _probe(self, step: Step, keep: torch.Tensor) -> None:
        gen = torch.Generator().manual_seed(self.shape.seed * 1_000_003 + step.batch.index)
        model = OneDeviceModel(self.view, [])  # a dispatched model's weights loaded for this batch
        fns = block_functions(self.view, model, step.targets.model_input, step.batch.attention_mask)
        for layer, (fn, x) in enumerate(fns):
            self.chi_sums[layer] += torch.tensor(hutchinson_sums(fn, x, keep, self.params.n_probes, gen))
        self.probes += self.params.n_probes
        wanted = self.svs.shape[1]
        if self.sv_filled < wanted:
            tokens = keep.nonzero().tolist()[: wanted - self.sv_filled]
            for row, position in tokens:
                for layer, (fn, x) in enumerate(self._token_blocks(step, model, row, position)):
                    jac = local_jacobian(fn, x, 0, position, self.params.chunk)
                    self.svs[layer, self.sv_filled] = torch.linalg.svdvals(jac)
                self.sv_filled += 1

    def _token_blocks(self, step: Step, model: OneDeviceModel, row: int,
                      position: int) -> list[tuple[BlockFn, torch.Tensor]]:
        """The blocks on the least input that gives token ``position`` of ``row`` its outputs: that
        sequence alone (rows do not interact), and in a causal model only its first ``position + 1``
        tokens (later ones do not reach it). One replay forward; each of the d forward-mode products
        of the dense Jacobian then runs on a few tokens, not on the whole batch."""
        end = position + 1 if self.view.causal else step.batch.attention_mask.shape[1]
        return block_functions(self.view, model, step.targets.model_input[row : row + 1, :end],
                               step.batch.attention_mask[row : row + 1, :end])

    def finalize(self) -> dict[str, Any]:
        if self.probes == 0 or float(self.chi_sums[:, 1].min()) == 0.0:
            raise ValueError("no token was probed: the probed batches hold no kept position")
        out: dict[str, Any] = {
            "chi": LayerValue(values=(self.chi_sums[:, 0] / self.chi_sums[:, 1]).tolist(), axis="block"),
            "n_probes": ScalarValue(value=self.probes),
        }
        notes = []
        if self.sequences:
            mean = self.collapse / self.sequences
            out["cosine"] = LayerValue(values=mean[:, 0].tolist(), axis="resid")
            out["residual"] = LayerValue(values=mean[:, 1].tolist(), axis="resid")
        else:
            notes.append("rank collapse not computed: no sequence has 2 kept tokens")
        if self.sv_filled:
            sv = self.svs[:, : self.sv_filled]
            out["sv_max"] = LayerValue(values=sv.amax(-1).mean(-1).tolist(), axis="block")
            out["sv_min"] = LayerValue(values=sv.amin(-1).mean(-1).tolist(), axis="block")
            out["sv_log_sd"] = LayerValue(values=sv.clamp_min(1e-300).log().std(-1).mean(-1).tolist(), axis="block")
        elif self.view.d_model > self.params.max_dense_dim:
            notes.append(
                f"singular values not computed: d_model {self.view.d_model} > max_dense_dim {self.params.max_dense_dim}"
            )
        else:
            notes.append("singular values not computed: sv_tokens is 0 or no token was kept")
        if notes:
            out["note"] = TextValue(text="; ".join(notes))
        return out
