"""Entry point of the plugin: registers its metrics with the core."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tensorscope_core.plugin_api import hookimpl

from .curvature import FisherLanczos, HessianLanczos
from .diagonal import FisherDiagonal
from .grouped import FisherGrouped
from .hotspots import FisherHotspots
from .hotspots_compare import HotspotsCompare
from .hotspots_report import TITLE as HOTSPOTS_TITLE
from .hotspots_report import hotspots_section
from .kfac import Kfac
from .kfac_stats import KFAC_STATS
from .masks import FisherMasks, FisherOverlap
from .natural_gradient import NaturalGradient
from .spectrum import Spectrum
from .stein_metric import FisherStein
from .triangulation import Triangulation
from .triangulation_report import TITLE as TRIANGULATION_TITLE
from .triangulation_report import triangulation_section

TENSORSCOPE_PLUGIN_API = 2

METRICS: tuple[type, ...] = (
    FisherDiagonal,
    FisherGrouped,
    FisherMasks,
    FisherOverlap,
    FisherLanczos,
    HessianLanczos,
    Kfac,
    NaturalGradient,
    Spectrum,
    FisherHotspots,
    HotspotsCompare,
    FisherStein,
    Triangulation,
)


@hookimpl
def register_metrics(register: Callable[[type], None]) -> None:
    for metric in METRICS:
        register(metric)


@hookimpl
def register_artifacts(register: Callable[[Any], None]) -> None:
    register(KFAC_STATS)


@hookimpl
def register_report_sections(register: Callable[[str, Callable[..., Any]], None]) -> None:
    register(HOTSPOTS_TITLE, hotspots_section)
    register(TRIANGULATION_TITLE, triangulation_section)
