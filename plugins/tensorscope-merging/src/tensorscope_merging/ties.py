"""TIES-merging maths (Yadav et al., NeurIPS 2023) on stacked flat task vectors [n_tasks, d].

Follows the reference ``prateeky2806/ties-merging`` ``src/utils/merge_utils.py``
(``topk_values_mask``, ``resolve_sign``, ``disjoint_merge``) and adds the sign-conflict counts
TensorScope reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def keep_count(d: int, density: float) -> int:
    """Entries the trim keeps per task when no magnitudes tie: ``int(d * density) + 1``, capped at d.

    The reference keeps ``|v| >= `` the k-th smallest magnitude with ``k = d - int(d * density)``,
    which is ``int(d * density) + 1`` entries (more when magnitudes tie at the threshold).
    """
    return min(d, int(d * density) + 1)


def trim_rank(d: int, density: float) -> int | None:
    """The rank (1-based, smallest first) of the magnitude the trim keeps from: ``d - int(d * density)``
    (the reference's ``topk_values_mask``); None when everything is kept (``density >= 1``: the
    reference's ``kthvalue`` would be asked for k = 0)."""
    kept_by_rank = int(d * density)
    return None if kept_by_rank >= d else d - kept_by_rank


def trim_at(vectors: torch.Tensor, thresholds: torch.Tensor | None) -> torch.Tensor:
    """Keep the entries of each row whose magnitude reaches the row's threshold, zero the rest
    (None: keep everything)."""
    if thresholds is None:
        return vectors.clone()
    return vectors * (vectors.abs() >= thresholds.to(vectors.device)[:, None])


def trim(vectors: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top magnitudes of each row of the whole stack (the reference's ``topk_values_mask``)."""
    rank = trim_rank(vectors.shape[1], density)
    return trim_at(vectors, None if rank is None else vectors.abs().kthvalue(rank, dim=1).values)


def elect_signs(trimmed: torch.Tensor, majority: torch.Tensor | None = None) -> torch.Tensor:
    """``sign(sum_t tau_t)`` per entry; zero sums take the majority sign ``sign(sum_p gamma_p)``
    (the reference's ``resolve_sign``) over all entries: ``majority`` when the stack is a slice of
    them (the sign of their summed ``sign_balance``), else that of ``trimmed`` itself."""
    signs = torch.sign(trimmed.sum(dim=0))
    if majority is None:
        majority = torch.sign(signs.sum())
    return torch.where(signs == 0, majority.to(signs), signs)


def sign_balance(trimmed: torch.Tensor) -> int:
    """``sum_p sign(sum_t tau_t)`` over the entries of a slice, as an exact integer (added up over
    slices, its sign is the majority sign)."""
    signs = torch.sign(trimmed.sum(dim=0))
    return int((signs > 0).sum()) - int((signs < 0).sum())


def disjoint_merge(trimmed: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Mean of the entries whose sign agrees with the elected one, 0 where none does."""
    agrees = torch.where(signs > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * agrees
    count = (selected != 0).sum(dim=0).clamp(min=1)
    return selected.sum(dim=0) / count


def ties_merge(vectors: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(trimmed vectors, elected signs, merged task vector ``tau_m``) of a whole stack: the definition
    ``merging.ties_conflicts`` reproduces slice by slice (its tests compare the two)."""
    trimmed = trim(vectors, density)
    signs = elect_signs(trimmed)
    return trimmed, signs, disjoint_merge(trimmed, signs)


def task_arithmetic(vectors: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * sum_t tau_t`` (Ilharco et al. 2023): the update task arithmetic adds to the base."""
    return lam * vectors.sum(dim=0)


@dataclass(frozen=True)
class SignCounts:
    """Counts over a slice of entries: conflicting (non-zero entries of both signs), entries
    with at least two non-zero task values, all entries, and the summed sign agreement ratio."""

    conflicting: int
    shared: int
    total: int
    agreement_sum: float

    def __add__(self, other: SignCounts) -> SignCounts:
        return SignCounts(self.conflicting + other.conflicting, self.shared + other.shared,
                          self.total + other.total, self.agreement_sum + other.agreement_sum)

    @property
    def conflict_fraction(self) -> float:
        """Conflicting entries over all entries (TensorScope's definition)."""
        return self.conflicting / self.total if self.total else float("nan")

    @property
    def conflict_among_shared(self) -> float:
        """Conflicting entries over the entries where at least two tasks are non-zero."""
        return self.conflicting / self.shared if self.shared else float("nan")

    @property
    def agreement(self) -> float:
        """Mean sign agreement ratio over the entries."""
        return self.agreement_sum / self.total if self.total else float("nan")


def sign_agreement_ratio(stack: torch.Tensor) -> torch.Tensor:
    """``|n_pos - n_neg| / (n_pos + n_neg)`` per entry, 1 where every task is zero (the reference helper)."""
    pos, neg = (stack > 0).sum(dim=0), (stack < 0).sum(dim=0)
    nonzero = pos + neg
    return torch.where(nonzero > 0, (pos - neg).abs().double() / nonzero.clamp(min=1), 1.0)


def sign_counts(stack: torch.Tensor) -> SignCounts:
    """The counts of one slice [n_tasks, d] of the stacked task vectors."""
    pos, neg = (stack > 0).sum(dim=0), (stack < 0).sum(dim=0)
    return SignCounts(conflicting=int(((pos > 0) & (neg > 0)).sum()), shared=int(((pos + neg) >= 2).sum()),
                      total=stack.shape[1], agreement_sum=float(sign_agreement_ratio(stack).sum()))
