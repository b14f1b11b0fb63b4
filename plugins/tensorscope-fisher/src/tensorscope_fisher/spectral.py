"""Spectral summary of a PSD matrix (a Fisher block) from its eigenvalues (fisher.stein, fisher.spectrum)."""

from __future__ import annotations

import torch

SUMMARY_KEYS = ("trace", "eigmax", "eigmin", "cond", "energy_r8", "energy_r16", "effective_rank")


def spectral_summary(eigenvalues: torch.Tensor) -> dict[str, float]:
    """Scalar summary of a spectrum ``λ_1 ≥ … ≥ λ_n`` (any order in; negatives from round-off clipped to 0).

    - ``trace`` = Σ λ_i;  ``eigmax`` = λ_1;  ``eigmin`` = λ_n (smallest, after clipping at 0).
    - ``cond`` = λ_1 / λ_n; ``inf`` when λ_n = 0 < λ_1 (singular), ``nan`` when all λ = 0.
    - ``energy_r`` = (Σ_{i≤r} λ_i) / trace, the share of the trace in the top r eigenvalues
      (``energy_r8``, ``energy_r16``; 1.0 when r ≥ n; ``nan`` when trace = 0).
    - ``effective_rank`` = smallest k with energy_k ≥ 0.9 (0 when trace = 0).

    Eigenvalues only from a partial spectrum (e.g. top-r by Lanczos) make trace, eigmin and cond those
    of the part given; pass the full spectrum for the definitions above.
    """
    if eigenvalues.ndim != 1 or eigenvalues.numel() == 0:
        raise ValueError("spectral_summary needs a non-empty 1-D tensor of eigenvalues, "
                         f"got shape {tuple(eigenvalues.shape)}")
    lam = torch.sort(eigenvalues.detach().to(torch.float64).clamp_min(0.0), descending=True).values
    trace = float(lam.sum())
    eigmax, eigmin = float(lam[0]), float(lam[-1])
    if eigmax == 0.0:
        cond = float("nan")
    else:
        cond = eigmax / eigmin if eigmin > 0.0 else float("inf")
    if trace > 0.0:
        energy = torch.cumsum(lam, 0) / trace
        energy_at = {r: float(energy[min(r, lam.numel()) - 1]) for r in (8, 16)}
        effective_rank = int(torch.searchsorted(energy, torch.tensor(0.9, dtype=torch.float64) - 1e-12).item()) + 1
        effective_rank = min(effective_rank, lam.numel())
    else:
        energy_at = {8: float("nan"), 16: float("nan")}
        effective_rank = 0
    return {
        "trace": trace,
        "eigmax": eigmax,
        "eigmin": eigmin,
        "cond": cond,
        "energy_r8": energy_at[8],
        "energy_r16": energy_at[16],
        "effective_rank": float(effective_rank),
    }
