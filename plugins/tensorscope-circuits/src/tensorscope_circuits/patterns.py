"""Pure maths on attention patterns: entropies and head-detection scores.

The metrics call these on captured patterns; the tests feed hand-coded patterns through
the same functions, so what is tested is what runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def visible_keys(key_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """[batch, q, k] bool: key k is a real token that query q may attend to."""
    real = key_mask.bool()
    allowed = real[:, None, :].expand(-1, real.shape[1], -1)
    if causal:
        seq = real.shape[1]
        allowed = allowed & torch.ones(seq, seq, dtype=torch.bool, device=real.device).tril()
    return allowed


@dataclass(frozen=True)
class EntropySums:
    """Per sequence: sums over the counted queries of H_q and H_q / ln(n_q), and their count."""

    entropy: torch.Tensor  # [batch, heads]
    normalised: torch.Tensor  # [batch, heads]
    count: torch.Tensor  # [batch]


def entropy_sums(attn: torch.Tensor, key_mask: torch.Tensor, causal: bool) -> EntropySums:
    """Shannon entropy (nats) of each attention row, summed per sequence over the counted queries.

    ``attn``: [batch, heads, q, k] probabilities; ``key_mask``: [batch, seq], 1 on real tokens.
    A query counts when it is a real token with n_q >= 2 visible real keys (n_q = q + 1 under a
    causal mask without padding, the number of real tokens for an encoder); its normalised
    entropy is H_q / ln(n_q), 1 for uniform attention over the visible keys. 0 ln 0 = 0.
    """
    a = attn.double()
    h = -torch.special.xlogy(a, a).sum(dim=-1)  # [batch, heads, q]
    n_keys = visible_keys(key_mask, causal).sum(dim=-1).double()  # [batch, q]
    counted = key_mask.bool() & (n_keys >= 2)
    weight = counted.double()
    log_n = torch.where(counted, n_keys, torch.full_like(n_keys, 2.0)).log()
    return EntropySums(entropy=(h * weight[:, None]).sum(dim=-1),
                       normalised=(h / log_n[:, None] * weight[:, None]).sum(dim=-1),
                       count=weight.sum(dim=-1))


def previous_token_pattern(seq: int) -> torch.Tensor:
    """[seq, seq]: D[q, q-1] = 1 (the sub-diagonal)."""
    return torch.diag(torch.ones(seq - 1), -1)


def duplicate_token_pattern(tokens: torch.Tensor) -> torch.Tensor:
    """[batch, seq, seq]: D[q, k] = 1 for k < q with tokens[k] == tokens[q]."""
    same = (tokens[:, :, None] == tokens[:, None, :]).double()
    return same.tril(diagonal=-1)


def induction_pattern(tokens: torch.Tensor) -> torch.Tensor:
    """[batch, seq, seq]: D[q, k] = 1 where tokens[k-1] == tokens[q] for k - 1 < q and k <= q:
    the token after an earlier occurrence of the current token (the duplicate pattern shifted one
    column right, as TransformerLens' ``head_detector``)."""
    dup = duplicate_token_pattern(tokens)
    shifted = torch.zeros_like(dup)
    shifted[..., 1:] = dup[..., :-1]
    return shifted.tril()


def detection_scores(attn: torch.Tensor, pattern: torch.Tensor, *, exclude_bos: bool = False,
                     exclude_current_token: bool = False, rows: str = "all") -> torch.Tensor:
    """TransformerLens ``detect_head`` "mul" score per sequence and head: sum(A*D) / sum(A).

    ``attn`` [batch, heads, q, k]; ``pattern`` D [q, k] or [batch, q, k]. ``exclude_bos`` zeroes
    column 0 of A first, ``exclude_current_token`` its diagonal. ``rows="all"`` sums over every
    query (TransformerLens); ``rows="targets"`` only over the queries where D has a target, so
    a head that always attends to its target scores 1 wherever its other rows attend. Returns
    [batch, heads] (NaN where the counted rows hold no attention).
    """
    a = attn.double().clone()
    if exclude_bos:
        a[..., 0] = 0.0
    if exclude_current_token:
        a = a * (1.0 - torch.eye(a.shape[-1], dtype=a.dtype, device=a.device))
    d = pattern.double().to(a.device)
    d = d[None, None] if d.dim() == 2 else d[:, None]
    if rows == "targets":
        a = a * (d.sum(dim=-1, keepdim=True) > 0)
    elif rows != "all":
        raise ValueError(f"rows must be 'all' or 'targets', got {rows!r}")
    return (a * d).sum(dim=(-2, -1)) / a.sum(dim=(-2, -1))
