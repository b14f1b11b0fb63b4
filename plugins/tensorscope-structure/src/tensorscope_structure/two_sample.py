"""Unbiased MMD^2 between tasks with an RBF kernel (median-heuristic bandwidth) and a label-permutation test."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

#: label permutations evaluated together (one [N, tasks x chunk] indicator matrix)
PERMUTATION_CHUNK = 64


@dataclass(frozen=True)
class MMDTest:
    """The statistic (mean over task pairs of the unbiased MMD^2), its permutation p-value and the bandwidth."""

    mmd2: float
    p_value: float
    bandwidth: float
    pairs: list[float]


def rbf_kernel(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """K_ij = exp(-||x_i - x_j||^2 / (2 h^2)) in float64, h = the median distance between distinct
    points (i < j) of all the tasks pooled: a bandwidth that ignores the labels, so the same K
    serves every permutation. Raises ValueError when h = 0 (half the pairs or more coincide)."""
    x = x.double()
    sq = torch.cdist(x, x).square()
    upper = torch.triu_indices(len(x), len(x), offset=1)
    h = float(np.median(sq[upper[0], upper[1]].sqrt().numpy()))  # the mean of the middle two for an even count
    if not h > 0:
        raise ValueError("the median distance between examples is 0: the RBF bandwidth is undefined")
    return torch.exp(-sq / (2 * h * h)), h


def pair_statistics(kernel: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD^2 of every task pair under each labelling: ``onehot`` [N, T, P] -> [P, T(T-1)/2].

    MMD^2_u(s, t) = S_ss / (n_s (n_s - 1)) + S_tt / (n_t (n_t - 1)) - 2 S_st / (n_s n_t), with
    S_st = sum_{i in s, j in t} K_ij and the diagonal i = j left out of S_ss.
    """
    n, tasks, perms = onehot.shape
    flat = onehot.reshape(n, tasks * perms)
    quad = torch.einsum("itp,iup->ptu", onehot, (kernel @ flat).reshape(n, tasks, perms))  # [P, T, T]
    sizes = onehot[:, :, 0].sum(0)
    diag = torch.einsum("i,itp->pt", kernel.diagonal(), onehot)
    within = (quad.diagonal(dim1=1, dim2=2) - diag) / (sizes * (sizes - 1))
    return torch.stack(
        [
            within[:, s] + within[:, t] - 2 * quad[:, s, t] / (sizes[s] * sizes[t])
            for s, t in itertools.combinations(range(tasks), 2)
        ],
        dim=1,
    )


def mmd_test(
    x: torch.Tensor, labels: np.ndarray, n_tasks: int, n_permutations: int, rng: np.random.Generator
) -> MMDTest:
    """Permutation test of "every task has the same distribution": the labels of the examples
    (one per sequence, so sequences move whole) are permuted ``n_permutations`` times;
    p = (1 + #{permuted statistic >= observed}) / (1 + n_permutations)."""
    kernel, h = rbf_kernel(x)
    eye = torch.eye(n_tasks, dtype=torch.float64)

    def statistics(labellings: list[np.ndarray]) -> torch.Tensor:
        onehot = eye[torch.as_tensor(np.stack(labellings, axis=1))]  # [N, P, T]
        return pair_statistics(kernel, onehot.permute(0, 2, 1))

    pairs = statistics([labels])[0]
    observed = float(pairs.mean())
    null: list[float] = []
    while len(null) < n_permutations:
        chunk = [rng.permutation(labels) for _ in range(min(PERMUTATION_CHUNK, n_permutations - len(null)))]
        null += statistics(chunk).mean(dim=1).tolist()
    reached = sum(s >= observed - 1e-12 * abs(observed) for s in null)
    return MMDTest(observed, (1 + reached) / (1 + n_permutations), h, pairs.tolist())
