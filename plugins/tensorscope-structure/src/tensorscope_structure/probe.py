"""Cross-validated logistic-probe accuracy of the task labels (scikit-learn)."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def probe_accuracy(x: np.ndarray, labels: np.ndarray, folds: int, c: float, seed: int) -> tuple[float, float, bool]:
    """Mean and SD over ``folds`` stratified folds (shuffled with ``seed``) of the held-out balanced
    accuracy of a standardised, L2-regularised (inverse strength ``c``) logistic regression, and
    whether a fit stopped before converging. Balanced accuracy is the mean per-task recall: chance
    is 1 / n_tasks whatever the task sizes, and with equal sizes it is the plain accuracy."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))
    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        scores = cross_val_score(model, x, labels, cv=splits, scoring="balanced_accuracy")
    stopped = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return float(scores.mean()), float(scores.std(ddof=1)), stopped
