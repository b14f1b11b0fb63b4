"""Entry point of the plugin: registers its metrics and artifacts with the core."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tensorscope_core.plugin_api import hookimpl

from .ablation import Ablation
from .attention_attribution import AttentionAttribution
from .attention_drift import AttentionDrift
from .attention_flow import AttentionFlow
from .attn_grad import ATTN_X_GRAD_SPEC
from .entropy import AttentionEntropy
from .head_scores import HeadScores
from .integrated_gradients import IntegratedGradients
from .interference import QKOVInterference
from .logit_lens import LogitLens
from .patching import ActivationPatching
from .qkov import QKOV
from .specialisation import HeadSpecialisation

TENSORSCOPE_PLUGIN_API = 2

METRICS: tuple[type, ...] = (
    LogitLens,
    AttentionFlow,
    IntegratedGradients,
    Ablation,
    ActivationPatching,
    AttentionEntropy, HeadScores, QKOV, QKOVInterference, HeadSpecialisation,
    AttentionDrift,
    AttentionAttribution,
)


@hookimpl
def register_metrics(register: Callable[[type], None]) -> None:
    for metric in METRICS:
        register(metric)


@hookimpl
def register_artifacts(register: Callable[[Any], None]) -> None:
    register(ATTN_X_GRAD_SPEC)
