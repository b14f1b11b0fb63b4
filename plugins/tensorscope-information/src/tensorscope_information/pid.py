"""information.pid: redundant, unique and synergistic information of two sources about a target."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from tensorscope_core.plugin_api import (
    BadParameterError,
    Cost,
    Metric,
    ModelView,
    Params,
    PreparedData,
    RunShape,
    ScalarValue,
    Step,
    TextValue,
)

from .block_parts import NAME as PARTS
from .discretise import Method, discretise
from .labels import bucket, frequent_tokens
from .pid_measures import ATOMS, Decomposition, Measure, decompose
from .resampling import bootstrap_counts, group_index, recentred_ci
from .tokens import TokenBank, bank_bytes, bank_capacity, per_sequence_quota

Sources = Literal["attn_mlp", "heads", "layers"]


class PIDParams(Params):
    sources: Sources = Field(
        "attn_mlp",
        description="'attn_mlp': attention vs MLP output of block `layer`; 'heads': "
        "two heads (`heads`) of block `layer`; 'layers': two resid "
        "entries (`layers`)",
    )
    layer: int | None = Field(None, description="the block for 'attn_mlp' and 'heads' (default: the last block)")
    heads: tuple[int, int] = Field((0, 1), description="the two heads for sources='heads'")
    layers: tuple[int, int] | None = Field(
        None, description="two resid entries for sources='layers' (default: n_layers - 1 and n_layers)"
    )
    target: Literal["next_token", "task"] = Field(
        "next_token", description="the position's loss target (bucketed) or the sequence's task"
    )
    target_classes: int = Field(
        4, ge=2, description="next-token target: the target_classes - 1 most frequent targets plus 'other'"
    )
    measure: Measure = Field(
        "wb",
        description="'wb' Williams-Beer I_min, 'broja' (an exponential-cone program per "
        "resample), 'mmi' minimum mutual information",
    )
    discretisation: Method = Field(
        "kmeans",
        description="'kmeans' on the standardised source, or 'pca_quantile': "
        "its first principal component in k equal-frequency bins",
    )
    k: int = Field(4, ge=2, le=64, description="states per source")
    min_samples_per_cell: int = Field(
        10, ge=1, description="the plug-in floor: tokens >= this x k x k x |T|, else the metric is skipped"
    )
    max_tokens: int = Field(4096, ge=16, description="tokens kept over the run")
    tokens_per_sequence: int = Field(64, ge=1, description="positions drawn per sequence (seeded; never position 0)")
    n_bootstrap: int = Field(50, ge=0, description="resamples of the sequences for the CIs (0: none)")


class PID(Metric):
    """Partial information decomposition (bits) of two sources about a discrete target, on a
    seeded sample of loss-target positions (position 0 excluded), through ``dit``:
    I(S1, S2; T) = redundancy + unique_1 + unique_2 + synergy, with I(Si; T) = redundancy + unique_i.

    Sources (``sources``): the attention and MLP outputs of one block (``attn_mlp``: what each
    writes into the residual stream, before any norm), two heads of one block (``heads``: their
    outputs, the input of the attention output projection), or two resid entries
    (``layers``). Each source is discretised into ``k`` states (k-means, or its first principal
    component in equal-frequency bins); the target is the loss target bucketed into the most
    frequent tokens plus "other", or the task. Probabilities are plug-in frequencies, whose bias
    needs N >> k * k * |T|: below ``min_samples_per_cell`` tokens per cell the metric is
    skipped (or, where the count is only known after the run, ends with that reason). CIs:
    sequences resampled, the spread recentred on the estimate (discretisation held fixed).
    """

    name = "information.pid"
    supports_dispatch = True  # reads the shared pass's activations only
    version = "1"
    summary = "redundancy, unique and synergistic information of two sources about the next token (dit)"
    Params = PIDParams
    artifacts = (PARTS,)
    fields = {
        **{atom: f"{atom.replace('_', ' ')} (bits), with a 95% CI over sequences" for atom in ATOMS},
        "mutual_information": "I(S1, S2; T) (bits), the sum of the four atoms",
        "tokens": "tokens the distribution was estimated on",
        "sample_floor": "min_samples_per_cell x k x k x |T|",
        "states": "k, states per source",
        "target_states": "|T|",
        "estimator": "the measure, the sources, the discretisation and the target, in words",
    }

    @classmethod
    def artifact_requests(cls, params: PIDParams, view: ModelView) -> dict[str, Any]:
        return {PARTS: {"parts": tuple(sorted(set(_parts(params, view))))}}

    @classmethod
    def skip_reason(cls, params: PIDParams, view: ModelView, data: PreparedData | None) -> str | None:
        if params.sources != "layers" and not view.attn_out:
            return f"the adapter of {view.name} maps no attention output projection: use sources='layers'"
        if params.target == "task" and (data is None or len(data.tasks) < 2):
            return "target='task' needs a run with at least two named tasks"
        if data is None:
            return None
        most = _most_tokens(params, data, view.causal)
        floor = _floor(params, data)
        if most < floor:
            return (
                f"at most {most} tokens but the plug-in estimate needs {floor} ({params.min_samples_per_cell} "
                f"per cell of {params.k} x {params.k} x {_target_states(params, data)}): give more data, "
                "or lower k / target_classes"
            )
        return None

    @classmethod
    def cost(cls, params: PIDParams, view: ModelView, shape: RunShape) -> Cost:
        capacity = bank_capacity(params.max_tokens, params.tokens_per_sequence, shape.n_sequences, shape.seq_len)
        return Cost(state_bytes=bank_bytes(capacity, _widths(params, view)))

    def setup(self) -> None:
        _validate(self.params, self.view)
        p, s = self.params, self.shape
        capacity = bank_capacity(p.max_tokens, p.tokens_per_sequence, s.n_sequences, s.seq_len)
        quota = per_sequence_quota(p.max_tokens, p.tokens_per_sequence, s.n_sequences, s.seq_len)
        self.bank = TokenBank(capacity, _widths(p, self.view), quota, s.seed, s.tasks)

    def update(self, step: Step) -> None:
        tensors = step[PARTS].tensors
        keys = _parts(self.params, self.view)
        if self.params.sources == "heads":
            d_head = self.view.d_head
            both = tensors[keys[0]]
            sources = [both[..., h * d_head : (h + 1) * d_head] for h in self.params.heads]
        else:
            sources = [tensors[key] for key in keys]
        self.bank.add(step, sources)

    def finalize(self) -> dict[str, Any]:
        bank, p, seed = self.bank, self.params, self.shape.seed
        n = bank.filled
        target, n_t = self._target()
        floor = p.min_samples_per_cell * p.k * p.k * n_t
        if n < floor:
            raise ValueError(
                f"{n} tokens are below the plug-in floor {floor} ({p.min_samples_per_cell} per cell of "
                f"{p.k} x {p.k} x {n_t}): give more data, or lower k / target_classes"
            )
        s1, s2 = (discretise(bank.kept(i).double().numpy(), p.k, p.discretisation, seed) for i in (0, 1))
        groups, n_groups = group_index(bank.sequence[:n])
        per_sequence = np.zeros((n_groups, p.k, p.k, n_t))
        np.add.at(per_sequence, (groups, s1, s2, target), 1.0)
        whole = decompose(per_sequence.sum(0), p.measure)
        resampled = self._resampled(per_sequence, n_groups)
        out: dict[str, Any] = {}
        for i, atom in enumerate(ATOMS):
            low, high = recentred_ci(resampled[:, i], getattr(whole, atom)) if len(resampled) else (None, None)
            low = None if low is None else max(0.0, low)  # every atom of these measures is >= 0
            out[atom] = ScalarValue(value=getattr(whole, atom), ci_low=low, ci_high=high, n=n, unit="bits")
        out.update(
            mutual_information=ScalarValue(value=whole.total, n=n, unit="bits"),
            tokens=n,
            sample_floor=floor,
            states=p.k,
            target_states=n_t,
            estimator=TextValue(text=self._describe(n_t)),
        )
        return out

    def _target(self) -> tuple[np.ndarray, int]:
        bank, p = self.bank, self.params
        if p.target == "task":
            return bank.task[: bank.filled].numpy(), len(bank.tasks)
        targets = bank.labels[: bank.filled]
        kept = frequent_tokens(targets, p.target_classes - 1)
        return bucket(targets, kept).numpy(), len(kept) + 1

    def _resampled(self, per_sequence: np.ndarray, n_groups: int) -> np.ndarray:
        if n_groups < 2 or self.params.n_bootstrap < 2:
            return np.zeros((0, len(ATOMS)))
        draws = bootstrap_counts(n_groups, self.params.n_bootstrap, self.shape.seed)
        tables = np.tensordot(draws, per_sequence, axes=1)
        return np.array([_atoms(decompose(t, self.params.measure)) for t in tables])

    def _describe(self, n_t: int) -> str:
        p = self.params
        parts = ", ".join(
            f"{part} of {'block' if part != 'resid' else 'resid entry'} {layer}" for part, layer in _parts(p, self.view)
        )
        if p.sources == "heads":
            parts = f"heads {p.heads[0]} and {p.heads[1]} ({parts})"
        target = "the sequence's task" if p.target == "task" else f"the loss target: top {n_t - 1} tokens + 'other'"
        return (
            f"measure {p.measure} (dit); sources: {parts}; discretisation: {p.discretisation}, k={p.k} states "
            f"per source; target: {target}; plug-in probabilities"
        )


def _atoms(d: Decomposition) -> list[float]:
    return [getattr(d, atom) for atom in ATOMS]


def _block(params: PIDParams, view: ModelView) -> int:
    return view.n_layers - 1 if params.layer is None else params.layer


def _parts(params: PIDParams, view: ModelView) -> list[tuple[str, int]]:
    """The (part, layer) keys of block_parts the sources come from, in source order."""
    if params.sources == "layers":
        a, b = params.layers if params.layers is not None else (view.n_layers - 1, view.n_layers)
        return [("resid", a), ("resid", b)] if 0 <= min(a, b) and max(a, b) <= view.n_layers else []
    block = _block(params, view)
    if not 0 <= block < view.n_layers:
        return []
    return [("attn", block), ("mlp", block)] if params.sources == "attn_mlp" else [("heads", block)]


def _validate(params: PIDParams, view: ModelView) -> None:
    if params.sources == "layers":
        a, b = params.layers if params.layers is not None else (view.n_layers - 1, view.n_layers)
        if not (0 <= min(a, b) and max(a, b) <= view.n_layers) or a == b:
            raise BadParameterError(
                f"layers={params.layers} must be two different resid entries in 0..{view.n_layers}",
                "pick two entries of the residual stream (0: embeddings)",
            )
        return
    block = _block(params, view)
    if not 0 <= block < view.n_layers:
        raise BadParameterError(
            f"layer={params.layer} is out of range: {view.name} has blocks 0..{view.n_layers - 1}", "pass a block index"
        )
    if params.sources == "heads" and (
        params.heads[0] == params.heads[1] or not all(0 <= h < view.n_heads for h in params.heads)
    ):
        raise BadParameterError(
            f"heads={params.heads} must be two different heads in 0..{view.n_heads - 1}", "pass two head indices"
        )


def _widths(params: PIDParams, view: ModelView) -> list[int]:
    return [view.d_head] * 2 if params.sources == "heads" else [view.d_model] * 2


def _target_states(params: PIDParams, data: PreparedData) -> int:
    return len(data.tasks) if params.target == "task" else params.target_classes


def _floor(params: PIDParams, data: PreparedData) -> int:
    return params.min_samples_per_cell * params.k * params.k * _target_states(params, data)


def _most_tokens(params: PIDParams, data: PreparedData, causal: bool) -> int:
    """An upper bound on the tokens the run will sample, exact for causal models (every real
    position but the first and the last, at most the per-sequence quota); for masked-LM encoders
    only the masked positions count, which the bound takes to be all but the first."""
    lengths = [int(m.sum()) for batch in data.batches() for m in batch.attention_mask]
    quota = per_sequence_quota(params.max_tokens, params.tokens_per_sequence, len(lengths), max(lengths, default=0))
    return min(params.max_tokens, sum(min(quota, max(0, n - 1 - causal)) for n in lengths))
