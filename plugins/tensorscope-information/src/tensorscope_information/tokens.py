"""The tokens the information metrics estimate on: a seeded sample of loss-target positions.

Every estimator here needs all its examples at once (a PCA, a probe split, k-means), so the
metrics keep a bounded sample of token representations rather than streaming statistics.
A token is a position whose loss target is real (``step.targets.target_mask``: the next
token of a causal model, a masked token of a masked-LM encoder), never position 0: in causal
models it is the attention sink (huge norms, no context), in BERT the ``[CLS]`` token.
Positions are drawn per sequence, seeded by the run's seed and the sequence's index in the
data, so two models run on the same data hold the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tensorscope_core.plugin_api import Step

#: bytes kept per token besides the representations: label, sequence index, task code (int64)
BOOKKEEPING_BYTES = 3 * 8


def per_sequence_quota(max_tokens: int, tokens_per_sequence: int, n_sequences: int, seq_len: int) -> int:
    """Positions drawn from each sequence: spread ``max_tokens`` over every sequence of the run."""
    spread = max(1, max_tokens // max(1, n_sequences))
    return max(0, min(tokens_per_sequence, spread, seq_len - 1))


def bank_capacity(max_tokens: int, tokens_per_sequence: int, n_sequences: int, seq_len: int) -> int:
    """The most tokens a run can put in the bank (what is allocated up front)."""
    quota = per_sequence_quota(max_tokens, tokens_per_sequence, n_sequences, seq_len)
    return min(max_tokens, n_sequences * quota)


def bank_bytes(capacity: int, widths: Sequence[int]) -> int:
    """Bytes of a ``TokenBank``: float32 rows of every source plus the bookkeeping."""
    return capacity * (4 * sum(widths) + BOOKKEEPING_BYTES)


class TokenBank:
    """Float32 representations of the sampled tokens, one matrix per source, and their labels.

    ``labels`` is the loss target at the position, ``sequence`` the sequence's index in the
    data (the bootstrap's resampled unit), ``task`` the index of its task in the run's tasks
    (-1 without tasks).
    """

    def __init__(self, capacity: int, widths: Sequence[int], quota: int, seed: int, tasks: Sequence[str]) -> None:
        self.sources = [torch.zeros(capacity, w, dtype=torch.float32) for w in widths]
        self.labels = torch.zeros(capacity, dtype=torch.long)
        self.sequence = torch.zeros(capacity, dtype=torch.long)
        self.task = torch.full((capacity,), -1, dtype=torch.long)
        self.quota = quota
        self.seed = seed
        self.tasks = tuple(tasks)
        self.filled = 0
        self.sequences_seen = 0

    def positions(self, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) of the positions drawn from this batch, in row-major order."""
        mask = step.targets.target_mask.detach().cpu().bool().clone()
        mask[:, 0] = False
        rows: list[torch.Tensor] = []
        cols: list[torch.Tensor] = []
        room = self.sources[0].shape[0] - self.filled
        for row in range(mask.shape[0]):
            candidates = mask[row].nonzero().flatten()
            take = min(self.quota, len(candidates), room)
            if take <= 0:
                continue
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.sequences_seen + row)
            pick = candidates[torch.randperm(len(candidates), generator=gen)[:take]].sort().values
            rows.append(torch.full((take,), row, dtype=torch.long))
            cols.append(pick)
            room -= take
        if not rows:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        return torch.cat(rows), torch.cat(cols)

    def add(self, step: Step, sources: Sequence[torch.Tensor]) -> None:
        """Keep the drawn positions of every source ``[batch, seq, width]`` of this batch."""
        rows, cols = self.positions(step)
        n, lo = len(rows), self.filled
        for bank, acts in zip(self.sources, sources, strict=True):
            if n:
                bank[lo : lo + n] = acts.detach()[rows.to(acts.device), cols.to(acts.device)].float().cpu()
        if n:
            self.labels[lo : lo + n] = step.targets.target_ids.detach().cpu()[rows, cols]
            self.sequence[lo : lo + n] = rows + self.sequences_seen
            if step.task is not None and step.task in self.tasks:
                self.task[lo : lo + n] = self.tasks.index(step.task)
        self.filled += n
        self.sequences_seen += int(step.batch.input_ids.shape[0])

    def kept(self, source: int) -> torch.Tensor:
        """The filled rows of one source."""
        return self.sources[source][: self.filled]
