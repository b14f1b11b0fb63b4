"""Familiar entry points: ``UnifiedModelAnalyzer`` and ``UnifiedConfig``, thin aliases over
``Analyzer`` and ``RunConfig`` for users who come with ``compute_fisher=True``-style habits.

A family flag ``compute_<family>`` exists for every installed metric family (read from the plugin
registry, so a new plugin brings its flag); ``results.get("fisher_spectrum")`` finds the namespaced
metric ``fisher.spectrum``. Nothing here computes: it only translates to the core API.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ConfigDict, model_validator

from .api import Analyzer, DataSpec, ModelsArg
from .config import RunConfig
from .errors import BadParameterError, did_you_mean
from .models.adapters import Adapter
from .plugins import Registry, get_registry
from .results import Results
from .results.schema import MetricResult

FLAG_PREFIX = "compute_"


def families(registry: Registry | None = None) -> list[str]:
    """The installed metric families (``fisher`` for ``fisher.spectrum``), sorted."""
    return sorted({name.split(".")[0] for name in (registry or get_registry()).metrics})


def flat_names(registry: Registry | None = None) -> dict[str, str]:
    """Flat name -> namespaced metric: ``fisher_spectrum`` -> ``fisher.spectrum`` (the dot becomes ``_``)."""
    return {name.replace(".", "_"): name for name in sorted((registry or get_registry()).metrics)}


class UnifiedConfig(RunConfig):
    """A ``RunConfig`` that also takes family flags: ``UnifiedConfig(compute_fisher=True, seed=1)``.

    With any flag True, exactly the flagged families run; with only False flags, every installed
    family but those; with none, every metric. Every other field is RunConfig's.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    @model_validator(mode="after")
    def _flags_known(self) -> UnifiedConfig:
        known = [FLAG_PREFIX + f for f in families()]
        for key, value in (self.model_extra or {}).items():
            if key not in known:
                hint = did_you_mean(key, known + list(RunConfig.model_fields))
                raise BadParameterError(f"UnifiedConfig has no setting {key!r}" + (f": {hint}" if hint else ""),
                                        f"family flags installed: {', '.join(known)}; the other settings are "
                                        "RunConfig's (see the user guide, RunConfig)")
            if not isinstance(value, bool):
                raise BadParameterError(f"{key} must be True or False, got {value!r}", f"pass {key}=True")
        return self

    @property
    def flags(self) -> dict[str, bool]:
        """The family flags given: {family: on}."""
        return {k.removeprefix(FLAG_PREFIX): bool(v) for k, v in (self.model_extra or {}).items()}

    def metric_selection(self) -> str | list[str]:
        """The metrics the flags select, as family patterns (``["fisher.*"]``), or "all"."""
        flags = self.flags
        chosen = [f for f, on in flags.items() if on] or [f for f in families() if flags.get(f, True)]
        if not flags or len(chosen) == len(families()):
            return "all"
        if not chosen:
            raise BadParameterError("every family flag is False: nothing would be computed",
                                    "set at least one compute_<family>=True, or leave the flags out for every metric")
        return [f"{family}.*" for family in sorted(chosen)]

    def run_config(self) -> RunConfig:
        """The plain RunConfig (what the run records), without the flags."""
        return RunConfig(**{k: getattr(self, k) for k in RunConfig.model_fields})


class UnifiedResults(Results):
    """``Results`` whose ``get`` also takes flat names (``"fisher_spectrum"``); namespaced names
    behave exactly as in ``Results.get``."""

    def get(self, metric: str, model: str | None = None) -> MetricResult:
        names = flat_names()
        if metric in names and "." not in metric:
            metric = names[metric]
        elif "." not in metric and metric not in self.record.model_set:
            present = {flat: name for flat, name in names.items() if self._has(name)}
            hint = did_you_mean(metric, present) or f"flat names of these results: {', '.join(present)}"
            raise KeyError(f"no metric named {metric!r}; {hint}")
        return super().get(metric, model)

    def _has(self, metric: str) -> bool:
        return metric in self.record.model_set or any(metric in m.metrics for m in self.record.models)


class UnifiedModelAnalyzer(Analyzer):
    """``Analyzer`` configured from a ``UnifiedConfig``: ``UnifiedModelAnalyzer(UnifiedConfig(
    compute_fisher=True)).analyze_models(["ckpt-100", "ckpt-500"])``. ``metrics`` (names or family
    patterns) overrides the flags; results answer flat names too."""

    def __init__(self, config: UnifiedConfig | RunConfig | None = None, *,
                 metrics: str | Sequence[str] | None = None, params: Mapping[str, Mapping[str, Any]] | None = None,
                 adapter: Adapter | None = None) -> None:
        config = config or UnifiedConfig()
        unified = config if isinstance(config, UnifiedConfig) else None
        selection = metrics if metrics is not None else (unified.metric_selection() if unified else "all")
        super().__init__(selection, config=unified.run_config() if unified else config, params=params,
                         adapter=adapter)

    def run(self, models: ModelsArg, data: DataSpec | None = None, **kwargs: Any) -> UnifiedResults:
        results = super().run(models, data, **kwargs)
        return UnifiedResults(results.record, results.tensors)

    analyze_models = run
