"""Plugin discovery (entry point group ``tensorscope``) and the registry of what plugins add.

Each entry point loads in its own try/except: a broken plugin is listed with its error
and never stops the others. ``TENSORSCOPE_LOAD_PLUGINS`` (comma-separated
distribution or entry-point names; empty = none) chooses which load.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from . import builtin, hookspecs
from .artifacts import ArtifactSpec
from .errors import PluginError, UnknownMetricError, did_you_mean
from .metric import Metric, MetricClass, ModelSetMetric
from .results.schema import PluginRecord

ENTRY_POINT_GROUP = "tensorscope"
LOAD_ENV = "TENSORSCOPE_LOAD_PLUGINS"


@dataclass
class Registry:
    """Everything registered by the loaded plugins, with who registered it."""

    metrics: dict[str, MetricClass] = field(default_factory=dict)
    metric_plugin: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, ArtifactSpec] = field(default_factory=dict)
    adapters: list[Any] = field(default_factory=list)
    report_sections: list[tuple[str, Callable[..., Any]]] = field(default_factory=list)
    plugins: list[PluginRecord] = field(default_factory=list)

    def metric(self, name: str) -> MetricClass:
        if name not in self.metrics:
            hint = did_you_mean(name, self.metrics)
            raise UnknownMetricError(f"unknown metric '{name}'" + (f": {hint}" if hint else ""),
                                     "run `tensorscope metrics` for the catalogue, or install the plugin "
                                     "that provides it (pip install 'tensorscope[<family>]')")
        return self.metrics[name]

    def plugin_version(self, plugin: str) -> str | None:
        return next((p.version for p in self.plugins if p.name == plugin), None)


def _validate_metric(cls: Any, plugin: str, registry: Registry) -> None:
    if not (isinstance(cls, type) and issubclass(cls, (Metric, ModelSetMetric))):
        raise PluginError(f"plugin {plugin} registered {cls!r}, which is neither a Metric nor a ModelSetMetric",
                          "register classes derived from tensorscope_core.plugin_api.Metric (per model) or "
                          "ModelSetMetric (over the models of a run)")
    if issubclass(cls, Metric) and cls.scope != "model":
        raise PluginError(f"plugin {plugin}: {cls.__name__} sets scope '{cls.scope}' on a per-model Metric",
                          "derive metrics over the models of a run from plugin_api.ModelSetMetric")
    name = getattr(cls, "name", "")
    if "." not in name:
        raise PluginError(f"plugin {plugin}: metric name '{name}' is not namespaced",
                          "name metrics 'family.metric'")
    if name in registry.metrics:
        raise PluginError(f"plugin {plugin}: metric '{name}' is already registered by "
                          f"{registry.metric_plugin[name]}", "rename one of them")


def _register_plugin(pm: pluggy.PluginManager, obj: Any, name: str, version: str | None,
                     registry: Registry) -> None:
    """Register one plugin object and collect what it adds; on any error roll it back."""
    api = getattr(obj, "TENSORSCOPE_PLUGIN_API", None)
    if api != hookspecs.PLUGIN_API_VERSION:
        raise PluginError(f"plugin {name} was written for plugin API {api}, this core speaks "
                          f"{hookspecs.PLUGIN_API_VERSION}", "upgrade the plugin or tensorscope")
    pm.register(obj, name=name)
    try:
        pm.check_pending()
        added_metrics: dict[str, MetricClass] = {}
        added_artifacts: dict[str, ArtifactSpec] = {}
        added_adapters: list[Any] = []
        added_sections: list[tuple[str, Callable[..., Any]]] = []

        def add_metric(cls: Any) -> None:
            _validate_metric(cls, name, registry)
            if cls.name in added_metrics:
                raise PluginError(f"plugin {name} registers '{cls.name}' twice", "register each metric once")
            added_metrics[cls.name] = cls

        def add_artifact(spec: Any) -> None:
            if not isinstance(spec, ArtifactSpec):
                raise PluginError(f"plugin {name} registered {spec!r}, not an ArtifactSpec", "register ArtifactSpec")
            if spec.name in registry.artifacts or spec.name in added_artifacts:
                raise PluginError(f"plugin {name}: artifact '{spec.name}' already exists", "rename it")
            added_artifacts[spec.name] = spec

        def add_adapter(adapter: Any) -> None:
            for attr in ("name", "matches", "build"):
                if not hasattr(adapter, attr):
                    raise PluginError(f"plugin {name}: adapter {adapter!r} lacks '{attr}'",
                                      "adapters need name, matches(model) and build(model, name, tokenizer)")
            added_adapters.append(adapter)

        others = [p for p in pm.get_plugins() if p is not obj]

        def call(hook_name: str, register: Callable[..., None]) -> None:
            pm.subset_hook_caller(hook_name, remove_plugins=others)(register=register)

        call("register_metrics", add_metric)
        call("register_artifacts", add_artifact)
        call("register_adapters", add_adapter)
        call("register_report_sections", lambda title, render: added_sections.append((title, render)))
    except Exception:
        pm.unregister(obj)
        raise
    registry.metrics.update(added_metrics)
    registry.metric_plugin.update({m: name for m in added_metrics})
    registry.artifacts.update(added_artifacts)
    registry.adapters.extend(added_adapters)
    registry.report_sections.extend(added_sections)
    registry.plugins.append(PluginRecord(name=name, version=version, metrics=sorted(added_metrics)))


def _selected(ep: metadata.EntryPoint, dist_name: str | None) -> bool:
    wanted = os.environ.get(LOAD_ENV)
    if wanted is None:
        return True
    names = {n.strip() for n in wanted.split(",") if n.strip()}
    return ep.name in names or (dist_name is not None and dist_name in names)


def _core_version() -> str:
    try:
        return metadata.version("tensorscope")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def build_registry(extra_plugins: list[tuple[str, Any]] | None = None) -> Registry:
    """Load the core's built-in plugin, every selected entry point, then ``extra_plugins``."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    _register_plugin(pm, builtin, "tensorscope-core", _core_version(), registry)
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        dist_name = dist.metadata["Name"] if dist is not None else None
        if not _selected(ep, dist_name):
            continue
        version = dist.version if dist is not None else None
        label = dist_name or ep.name
        try:
            obj = ep.load()
            _register_plugin(pm, obj, label, version, registry)
        except Exception as exc:  # a broken plugin must never stop the others
            registry.plugins.append(PluginRecord(name=label, version=version, status="broken",
                                                 error=f"{type(exc).__name__}: {exc}"))
    for label, obj in extra_plugins or []:
        try:
            _register_plugin(pm, obj, label, getattr(obj, "__version__", None), registry)
        except Exception as exc:
            registry.plugins.append(PluginRecord(name=label, status="broken", error=f"{type(exc).__name__}: {exc}"))
    return registry


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = build_registry()
    return _REGISTRY


def reset_registry() -> None:
    """Forget the registry so the next use reloads plugins (after installing one, in tests)."""
    global _REGISTRY
    _REGISTRY = None


@contextmanager
def registry_in_use(registry: Registry) -> Iterator[Registry]:
    """Make ``registry`` the process-wide one inside the block (the CLI and ``analyze()`` without
    ``registry=`` use it), and put the previous one back on exit."""
    global _REGISTRY
    saved = _REGISTRY
    _REGISTRY = registry
    try:
        yield registry
    finally:
        _REGISTRY = saved


def plugin_module(name: str, **hooks: Callable[..., Any]) -> types.ModuleType:
    """Build a plugin object from hook functions (for tests and notebooks)."""
    module = types.ModuleType(name)
    module.TENSORSCOPE_PLUGIN_API = hookspecs.PLUGIN_API_VERSION  # type: ignore[attr-defined]
    for hook_name, fn in hooks.items():
        setattr(module, hook_name, hookspecs.hookimpl(fn))
    return module
