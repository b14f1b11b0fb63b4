"""Entry point of the plugin: registers its metrics with the core."""

from __future__ import annotations

from collections.abc import Callable

from tensorscope_core.plugin_api import hookimpl

from .curvature import Curvature
from .effective_rank import EffectiveRank
from .features import SuperpositionFeatures
from .fiber_bundle import FiberBundle
from .sample_outliers import SampleOutliers
from .similarity import CKA, RSA, CKAAcross, RSAAcross
from .similarity_terms import SimilarityTerms
from .singularities import Singularities
from .sparsity import SuperpositionSparsity

TENSORSCOPE_PLUGIN_API = 2

METRICS: tuple[type, ...] = (
    EffectiveRank, SimilarityTerms, CKA, RSA, CKAAcross, RSAAcross, SuperpositionFeatures, SuperpositionSparsity,
    FiberBundle, Singularities, Curvature, SampleOutliers,
)


@hookimpl
def register_metrics(register: Callable[[type], None]) -> None:
    for metric in METRICS:
        register(metric)
