"""Discretisation of a continuous source into k states, for plug-in information measures.

``kmeans``: k-means (scikit-learn, seeded, several restarts) on the standardised vectors;
``pca_quantile``: the first principal component cut into k equal-frequency bins.
The state labels are arbitrary; every information measure is invariant to relabelling.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from sklearn.cluster import KMeans

Method = Literal["kmeans", "pca_quantile"]


def discretise(x: np.ndarray, k: int, method: Method, seed: int) -> np.ndarray:
    """State 0..k-1 of each row of ``x`` [n, d]."""
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(0)
    scale = centred.std(0)
    z = centred / np.where(scale > 0, scale, 1.0)
    if method == "kmeans":
        return np.asarray(KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(z), dtype=np.int64)
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    score = z @ vt[0]
    edges = np.quantile(score, np.linspace(0.0, 1.0, k + 1)[1:-1])
    return np.searchsorted(edges, score, side="right").astype(np.int64)
