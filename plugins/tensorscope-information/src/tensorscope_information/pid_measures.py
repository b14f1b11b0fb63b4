"""Partial information decomposition of a plug-in joint distribution, through ``dit``.

I(S1, S2; T) = R + U1 + U2 + S and I(Si; T) = R + Ui, in bits. Measures: Williams-Beer
I_min, BROJA (unique information by optimisation over the distributions with the same
source-target marginals, solved as an exponential cone program) and MMI (R = min_i I(Si; T)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import dit
import numpy as np
from dit.pid import PID_BROJA, PID_MMI, PID_WB

Measure = Literal["wb", "broja", "mmi"]
MEASURES = {"wb": PID_WB, "broja": PID_BROJA, "mmi": PID_MMI}
#: BROJA through the exponential-cone program (ECOS; Makkeh et al. 2018): dit's default SLSQP route
#: misses XOR's zero unique information by ~1e-5 and can return negative atoms
OPTIONS: dict[str, dict[str, str]] = {"broja": {"method": "cone"}}
ATOMS = ("redundancy", "unique_1", "unique_2", "synergy")


@dataclass
class Decomposition:
    redundancy: float
    unique_1: float
    unique_2: float
    synergy: float

    @property
    def total(self) -> float:
        return self.redundancy + self.unique_1 + self.unique_2 + self.synergy


def joint_counts(s1: np.ndarray, s2: np.ndarray, t: np.ndarray, k1: int, k2: int, n_t: int) -> np.ndarray:
    """[k1, k2, n_t] counts of the triples (s1, s2, t)."""
    counts = np.zeros((k1, k2, n_t))
    np.add.at(counts, (s1, s2, t), 1.0)
    return counts


def decompose(counts: np.ndarray, measure: Measure) -> Decomposition:
    """PID (bits) of the plug-in distribution of a [k1, k2, n_t] count table."""
    cells = np.argwhere(counts > 0)
    outcomes = [(int(a), int(b), int(c)) for a, b, c in cells]
    pmf = counts[counts > 0] / counts.sum()
    distribution = dit.Distribution(outcomes, pmf.tolist())
    pid = MEASURES[measure](distribution, [[0], [1]], [2], **OPTIONS.get(measure, {}))
    return Decomposition(
        redundancy=float(pid.get_pi(((0,), (1,)))),
        unique_1=float(pid.get_pi(((0,),))),
        unique_2=float(pid.get_pi(((1,),))),
        synergy=float(pid.get_pi(((0, 1),))),
    )
