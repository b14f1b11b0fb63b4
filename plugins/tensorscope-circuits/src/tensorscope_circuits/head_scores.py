"""circuits.head_scores: previous-token, duplicate-token and induction heads on repeated random tokens."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from tensorscope_core.plugin_api import (
    Cost,
    LayerValue,
    Metric,
    ModelView,
    Params,
    PreparedData,
    RunShape,
    TableValue,
    TextValue,
    forward_act_bytes,
)

from .headstats import mean_grid
from .patterns import detection_scores, duplicate_token_pattern, induction_pattern, previous_token_pattern

KINDS = ("previous_token", "duplicate_token", "induction")
DEFAULT_LENGTH = 50


class HeadScoresParams(Params):
    sequence_length: int | None = Field(None, ge=2, description="T, the length of the random block R (the "
                                        "sequence is [BOS] R R); default min(50, what the positions allow)")
    n_sequences: int = Field(10, ge=2, description="number of random sequences (the CIs resample them)")
    bos: Literal["auto", "always", "never"] = Field("auto", description="prepend the BOS token: 'auto' when "
                                                    "the tokenizer or config names one")
    exclude_bos: bool = Field(True, description="zero the attention on the prepended BOS before scoring")
    exclude_current_token: bool = Field(False, description="zero the attention of each token on itself")
    rows: Literal["all", "targets"] = Field("targets", description="'all': every query counts (TransformerLens "
                                            "detect_head); 'targets': only queries where the pattern has a target")
    threshold: float = Field(0.5, ge=0, le=1, description="a head is listed as detected when its score >= this")
    batch_size: int = Field(8, ge=1, description="sequences per forward of the metric's own pass")


def bos_id(view: ModelView) -> int | None:
    """The beginning-of-sequence token: the tokenizer's BOS (or CLS), else the config's."""
    for source, attr in ((view.tokenizer, "bos_token_id"), (view.tokenizer, "cls_token_id"),
                         (view.config, "bos_token_id")):
        value = getattr(source, attr, None) if source is not None else None
        if isinstance(value, int):
            return value
    return None


def _plan(params: HeadScoresParams, view: ModelView) -> tuple[int, int | None]:
    """(T, BOS id or None); raises ValueError naming the problem and the fix."""
    bos = None if params.bos == "never" else bos_id(view)
    if params.bos == "always" and bos is None:
        raise ValueError("bos='always' but neither the tokenizer nor the config names a BOS token; use bos='never'")
    extra = 0 if bos is None else 1
    room = None if view.max_positions is None else (view.max_positions - extra) // 2
    length = params.sequence_length or (DEFAULT_LENGTH if room is None else min(DEFAULT_LENGTH, room))
    if room is not None and length > room:
        raise ValueError(f"sequence_length {length} needs {2 * length + extra} positions, the model has "
                         f"{view.max_positions}: set sequence_length <= {room}")
    if length < 2:
        raise ValueError(f"the model's {view.max_positions} positions leave no room for two repeated blocks")
    if len(candidate_tokens(view)) < length:
        raise ValueError(f"the vocabulary has {len(candidate_tokens(view))} ordinary tokens, fewer than "
                         f"sequence_length {length} distinct ones: lower sequence_length")
    return length, bos


def candidate_tokens(view: ModelView) -> torch.Tensor:
    """Token ids the random blocks are drawn from: the vocabulary minus special tokens."""
    special = {view.pad_token_id}
    special |= set(getattr(view.tokenizer, "all_special_ids", None) or [])
    bos = bos_id(view)
    if bos is not None:
        special.add(bos)
    keep = torch.ones(view.vocab_size, dtype=torch.bool)
    keep[[s for s in special if 0 <= s < view.vocab_size]] = False
    return keep.nonzero().flatten()


def repeated_random_tokens(view: ModelView, n: int, length: int, bos: int | None, seed: int) -> torch.Tensor:
    """[n, (1) + 2T]: [BOS] R R with R = T distinct tokens drawn uniformly without replacement."""
    candidates = candidate_tokens(view)
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.stack([candidates[torch.randperm(len(candidates), generator=gen)[:length]] for _ in range(n)])
    ids = torch.cat([blocks, blocks], dim=1)
    if bos is not None:
        ids = torch.cat([torch.full((n, 1), bos, dtype=ids.dtype), ids], dim=1)
    return ids


@torch.no_grad()
def attention_of(view: ModelView, ids: torch.Tensor) -> list[torch.Tensor]:
    """Attention probabilities per layer [batch, heads, seq, seq] of the model on ``ids`` (eager kernel)."""
    device = view.input_device
    out = view.model(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                     output_attentions=True, use_cache=False)
    attentions = getattr(out, "attentions", None)
    if not attentions or attentions[0] is None:
        raise RuntimeError(f"{view.name} returned no attention weights: load it with attn_implementation='eager'")
    return list(attentions)


def sequence_scores(attentions: list[torch.Tensor], ids: torch.Tensor, kinds: tuple[str, ...], *,
                    has_bos: bool, exclude_bos: bool, exclude_current_token: bool, rows: str) -> np.ndarray:
    """[batch, layers, heads, kinds] detection scores of every head on each sequence."""
    patterns = {"previous_token": previous_token_pattern(ids.shape[1]),
                "duplicate_token": duplicate_token_pattern(ids), "induction": induction_pattern(ids)}
    out = np.empty((ids.shape[0], len(attentions), attentions[0].shape[1], len(kinds)))
    for layer, attn in enumerate(attentions):
        for k, kind in enumerate(kinds):
            out[:, layer, :, k] = detection_scores(
                attn, patterns[kind], exclude_bos=has_bos and exclude_bos,
                exclude_current_token=exclude_current_token, rows=rows).cpu().numpy()
    return out


class HeadScores(Metric):
    """Previous-token, duplicate-token and induction score of every head, on sequences the
    metric draws itself (not the run's data): n_sequences sequences [BOS] R R, where R holds T
    distinct tokens drawn uniformly without replacement from the vocabulary minus the special
    tokens, with the run's seed. The model runs on them once, without gradients, with the
    eager attention kernel (one forward per batch_size sequences).

    Positions are 0-indexed over the whole sequence (BOS at 0 when prepended). For a head's
    attention A and a detection pattern D the score of one sequence is TransformerLens'
    ``detect_head`` "mul" measure sum(A * D) / sum(A), where:

    - previous-token: D[q, q-1] = 1 for every q >= 1;
    - duplicate-token: D[q, k] = 1 for k < q holding the same token as q (so q in the second
      R, k = q - T);
    - induction: D[q, k] = 1 where token k-1 is an earlier occurrence of token q: the token
      after it (k = q - T + 1, q in the second R).

    Before summing, ``exclude_bos`` zeroes the attention on the BOS column (only when a BOS
    was prepended) and ``exclude_current_token`` the diagonal. ``rows="all"`` sums over every
    query, exactly as ``detect_head``: a perfect induction head on [BOS] R R then scores
    T/(2T+1), or 1 with ``exclude_bos``. ``rows="targets"`` (default) sums only over the queries
    where D has a target (q >= 1 for previous-token, the second R for the other two), so a
    perfect head scores 1 with or without BOS. The value is the mean over sequences, with a
    percentile-bootstrap CI resampling sequences; heads scoring >= threshold are listed in
    ``detected``. On a bidirectional encoder the induction score is not defined (an induction
    head predicts the next token from the past; an encoder sees the token it would predict), so
    only the previous- and duplicate-token scores are computed and ``notes`` says so.
    """

    name = "circuits.head_scores"
    supports_dispatch = True  # replays whole forwards on probe sequences; reads the patterns only
    version = "2"
    summary = "previous-token, duplicate-token and induction score per head on repeated random tokens, with CIs"
    Params = HeadScoresParams
    artifacts = ("weights",)
    fields = {
        **{f"{k}{s}": f"layer x head {k.replace('_', '-')} score{w}" for k in KINDS
           for s, w in (("", ""), ("_ci_low", ", lower end of its 95% bootstrap CI"),
                        ("_ci_high", ", upper end of that CI"))},
        **{f"{k}_max": f"per layer: the highest {k.replace('_', '-')} score of its heads (the layer's score)"
           for k in KINDS},
        "detected": "table of heads scoring >= threshold: layer, head, kind, score",
        "notes": "what was drawn (T, sequences, BOS) and which scores do not apply",
    }

    @classmethod
    def skip_reason(cls, params: HeadScoresParams, view: ModelView, data: PreparedData | None) -> str | None:
        try:
            _plan(params, view)
        except ValueError as exc:
            return str(exc)
        return None

    @classmethod
    def _kinds(cls, view: ModelView) -> tuple[str, ...]:
        return KINDS if view.causal else KINDS[:2]

    @classmethod
    def cost(cls, params: HeadScoresParams, view: ModelView, shape: RunShape) -> Cost:
        try:
            length, bos = _plan(params, view)
        except ValueError:
            return Cost()  # skipped: skip_reason names the problem
        seq = 2 * length + (bos is not None)
        n = params.n_sequences
        flops = 2.0 * view.n_params * n * seq + 4.0 * view.n_layers * n * seq * seq * view.d_model
        rows = min(params.batch_size, n)
        patterns = view.n_layers * rows * view.n_heads * seq * seq * view.dtype_bytes  # every layer's, returned
        return Cost(state_bytes=8 * n * view.n_layers * view.n_heads * len(cls._kinds(view)), flops=flops,
                    transient_bytes=forward_act_bytes(view, rows, seq, loss=False) + patterns)

    @classmethod
    def own_passes(cls, params: HeadScoresParams, view: ModelView, shape: RunShape) -> dict[str, int]:
        """One forward (eager attention, no gradients) per ``batch_size`` of the ``n_sequences``
        random sequences, in ``finalize``; the run's data are not used."""
        return {"replay_forward": -(-params.n_sequences // params.batch_size)}

    def finalize(self) -> dict[str, Any]:
        p: HeadScoresParams = self.params
        length, bos = _plan(p, self.view)
        kinds = self._kinds(self.view)
        ids = repeated_random_tokens(self.view, p.n_sequences, length, bos, self.shape.seed)
        self.scores = np.concatenate([
            sequence_scores(attention_of(self.view, chunk), chunk, kinds, has_bos=bos is not None,
                            exclude_bos=p.exclude_bos, exclude_current_token=p.exclude_current_token, rows=p.rows)
            for chunk in ids.split(p.batch_size)])
        out: dict[str, Any] = {}
        for k, kind in enumerate(kinds):
            out.update(mean_grid(self.scores[..., k], seed=self.shape.seed, name=kind))
            out[f"{kind}_max"] = LayerValue(values=[max((v for v in row if v is not None), default=None)
                                                    for row in out[kind].values], axis="block")
        detected = [[layer, head, kind, float(score)] for kind in kinds
                    for layer, row in enumerate(out[kind].values) for head, score in enumerate(row)
                    if score is not None and score >= p.threshold]
        out["detected"] = TableValue(columns=["layer", "head", "kind", "score"],
                                     rows=sorted(detected, key=lambda r: -r[3]))
        note = (f"T={length}, {p.n_sequences} sequences, "
                + (f"BOS {bos} prepended" if bos is not None else "no BOS"))
        if not self.view.causal:
            note += "; induction not computed: not defined for a bidirectional encoder"
        out["notes"] = TextValue(text=note)
        return out
