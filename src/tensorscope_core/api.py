"""analyze(): load -> validate data -> plan every model -> run -> Results."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import RunConfig
from .data import DataSpec, PreparedData, builtin_corpus, materialize, prepare_data
from .errors import PlanDoesNotFitError, UsageError
from .metric import RunShape
from .models.adapters import Adapter
from .models.load import ModelSource, load_model, modules_restored
from .models.view import ModelView
from .plugins import Registry, get_registry
from .results import Results
from .results.schema import MetricResult, ModelRecord, RunRecord
from .results.store import ResultCache
from .scheduler.graph import MetricNode, resolve
from .scheduler.plan import ModelPlan, make_plan
from .scheduler.run import ModelRunner, needed_tensors, to_values

ModelSpec = str | os.PathLike[str] | nn.Module | ModelSource
ModelsArg = ModelSpec | Sequence[ModelSpec] | Mapping[str, ModelSpec]
#: the model name the base of a model set (``base=``) takes
BASE_NAME = "base"


def _sources(models: ModelsArg, base_config: str | None, base: ModelSpec | None = None) -> list[ModelSource]:
    """The models to load, in order; a base model comes first, named ``base``."""
    def one(spec: ModelSpec, name: str | None = None) -> ModelSource:
        if isinstance(spec, ModelSource):
            return spec
        return ModelSource(spec, base_config=base_config, name=name)

    if isinstance(models, Mapping):
        sources = [one(spec, name) for name, spec in models.items()]
    elif isinstance(models, (str, os.PathLike, nn.Module, ModelSource)):
        sources = [one(models)]
    else:
        sources = [one(m) for m in models]
    if base is None:
        return sources
    if any(s.display_name == BASE_NAME for s in sources):
        raise UsageError(f"a member of the model set is named '{BASE_NAME}', the name the base model (base=) takes",
                         f"rename that member, or pass it as the base instead of naming it '{BASE_NAME}'")
    return [dataclasses.replace(one(base), name=BASE_NAME), *sources]


@dataclass
class Prepared:
    """One model, loaded and checked, with its data and plan (nothing has run yet)."""

    source: ModelSource
    view: ModelView | None
    data: PreparedData | None
    shape: RunShape
    plan: ModelPlan


def _needs_data(nodes: Sequence[MetricNode]) -> bool:
    return any(set(n.cls.artifacts) - {"weights"} or (n.cls.scope == "model_set" and n.cls.uses_data(n.params))
               for n in nodes if n.unavailable is None)


def _prepare(src: ModelSource, data: DataSpec | None, nodes: Sequence[MetricNode], config: RunConfig,
             registry: Registry, adapter: Adapter | None, tokenizer: Any) -> Prepared:
    view = load_model(src, registry.adapters, dtype=config.dtype, device=config.device, adapter=adapter,
                      tokenizer=tokenizer)
    prepared_data = None
    if _needs_data(nodes):
        spec = data if data is not None else builtin_corpus()
        prepared_data = prepare_data(spec, view, batch_size=config.batch_size, max_length=config.max_length,
                                     max_batches=config.max_batches)
    shape = RunShape(
        batch_size=config.batch_size,
        seq_len=prepared_data.max_seq_len if prepared_data else 0,
        n_batches=prepared_data.n_batches() if prepared_data else 0,
        n_sequences=prepared_data.n_sequences if prepared_data else 0,
        tasks=tuple(prepared_data.tasks) if prepared_data else (),
        seed=config.seed)
    plan = make_plan(nodes, view, shape, registry, config.budget_bytes, config.min_micro_batch)
    return Prepared(src, view, prepared_data, shape, plan)


def plan(models: ModelsArg, data: DataSpec | None = None, metrics: str | Sequence[str] = "all", *,
         config: RunConfig | None = None, params: Mapping[str, Mapping[str, Any]] | None = None,
         base_config: str | None = None, adapter: Adapter | None = None, tokenizer: Any = None,
         base: ModelSpec | None = None) -> list[ModelPlan]:
    """The pass and memory plan of each model (the base first, when given), without running any pass."""
    config = config or RunConfig()
    registry = get_registry()
    nodes = resolve(metrics, params or {}, registry)
    sources = _sources(models, base_config, base)
    plans = []
    with modules_restored(sources):
        for src in sources:
            prepared = _prepare(src, data, nodes, config, registry, adapter, tokenizer)
            plans.append(prepared.plan)
            prepared.view = None
    return plans


def _record_model(runner: ModelRunner, prepared: Prepared, order: Sequence[str]) -> ModelRecord:
    view = runner.view
    d = prepared.data
    notes = list(d.notes) if d else []
    notes += [f"artifact '{k}' held {v} bytes per batch at most" for k, v in sorted(runner.artifact_bytes.items())]
    return ModelRecord(
        name=view.name, family=view.family, fingerprint=runner.model_fingerprint, dims=view.dims(),
        data_fingerprint=runner.data_fingerprint, n_sequences=len(d.used_sequences()) if d else 0,
        n_tokens=sum(len(s) for s in d.used_sequences()) if d else 0,
        passes=dict(runner.passes), notes=notes,
        metrics={name: runner.results[name] for name in order if name in runner.results})


def _run_model_set(nodes: Sequence[MetricNode], views: dict[str, ModelView], records: list[ModelRecord],
                   tensors: dict[str, torch.Tensor], *, base_name: str | None = None,
                   data: Mapping[str, PreparedData] | None = None,
                   shape: RunShape | None = None) -> dict[str, MetricResult]:
    results: dict[str, MetricResult] = {}
    per_model = {r.name: r.metrics for r in records}
    for node in nodes:
        if node.cls.scope != "model_set":
            continue
        base = {"metric": node.name, "version": node.cls.version, "plugin": node.plugin,
                "params": node.params.model_dump(mode="json")}
        if node.unavailable:
            results[node.name] = MetricResult(**base, status="error", reason=node.unavailable,
                                              error_type="Unavailable")
            continue
        failed = [(model, dep, metrics[dep]) for model, metrics in per_model.items()
                  for dep in node.needs if dep in metrics and not metrics[dep].ok]
        if failed:  # as for per-model metrics: a dependency that did not end ok skips its dependents
            model, dep, cause = failed[0]
            results[node.name] = MetricResult(**base, status="skipped",
                                              reason=f"dependency '{dep}' {cause.status} on {model}: {cause.reason}")
            continue
        if node.cls.needs_base and base_name is None:
            results[node.name] = MetricResult(**base, status="skipped", reason=(
                f"{node.name} compares fine-tunes with their base model and this run has none: "
                f"pass base=... (CLI --base BASE_MODEL)"))
            continue
        start = time.perf_counter()
        try:
            reason = node.cls.set_skip_reason(node.params, views, base_name)
            if reason is not None:
                results[node.name] = MetricResult(**base, status="skipped", reason=reason)
                continue
            needed = needed_tensors((metrics[dep] for metrics in per_model.values() for dep in node.needs
                                     if dep in metrics), tensors)
            instance = node.cls(node.params, shape or RunShape(0, 0, 0, 0, (), 0), None, {}, needed,
                                base_name=base_name, data=data)
            output = instance.compute_set(views, per_model)
            values = to_values(node.name, "*", output, tensors)
            results[node.name] = MetricResult(**base, status="ok", values=values,
                                              seconds=round(time.perf_counter() - start, 4))
        except Exception as exc:
            results[node.name] = MetricResult(**base, status="error", reason=f"{type(exc).__name__}: {exc}",
                                              error_type=type(exc).__name__)
    return results


def analyze(models: ModelsArg, data: DataSpec | None = None, metrics: str | Sequence[str] = "all", *,
            config: RunConfig | None = None, params: Mapping[str, Mapping[str, Any]] | None = None,
            base_config: str | None = None, adapter: Adapter | None = None, tokenizer: Any = None,
            base: ModelSpec | None = None) -> Results:
    """Compute ``metrics`` on each model in one shared run per model.

    ``models``: a path, a module, a list of them, or ``{name: model}``. ``base``: the base
    model of a model set (fine-tunes of it in ``models``); it runs first, like every other
    model, under the name ``base``, and model-set metrics see it as ``self.base_name``. ``data``: texts, a
    .txt/.jsonl path, token id tensors, a DataLoader, or ``{task: data}``; None uses the
    built-in corpus. Every model is loaded, its data checked and its memory planned
    before any pass runs: a plan over ``config.memory_budget`` raises PlanDoesNotFitError.
    """
    config = config or RunConfig()
    registry = get_registry()
    nodes = resolve(metrics, params or {}, registry)
    sources = _sources(models, base_config, base)
    data = materialize(data)
    with modules_restored(sources):
        return _analyze(sources, data, nodes, config, registry, adapter, tokenizer,
                        BASE_NAME if base is not None else None)


def _analyze(sources: list[ModelSource], data: DataSpec | None, nodes: list[MetricNode], config: RunConfig,
             registry: Registry, adapter: Adapter | None, tokenizer: Any, base_name: str | None = None) -> Results:
    started = time.perf_counter()
    prepared: list[Prepared] = []
    for i, src in enumerate(sources):
        p = _prepare(src, data, nodes, config, registry, adapter, tokenizer)
        if not p.plan.fits:
            raise PlanDoesNotFitError(
                f"the plan for {p.plan.model} needs {p.plan.peak_bytes} bytes, over the budget of "
                f"{config.budget_bytes} even at micro-batch {p.plan.micro_batch}",
                "raise memory_budget, lower batch_size or max_length, or ask for fewer metrics",
                p.plan.render())
        if i < len(sources) - 1 and isinstance(src.source, (str, os.PathLike)):
            p.view = None  # reloaded when its turn comes: only one model is held at a time
        prepared.append(p)
    cache = ResultCache(Path(config.cache_dir)) if config.cache_dir else None
    progress = None
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        total = sum(p.shape.n_batches * len({n.stage for n in nodes}) for p in prepared)
        bar = tqdm(total=total, desc="analysing", unit="batch")
        progress = (lambda model, n: bar.update(n))  # noqa: E731
    records: list[ModelRecord] = []
    tensors: dict[str, torch.Tensor] = {}
    keep_views = any(n.cls.scope == "model_set" for n in nodes)
    views: dict[str, ModelView] = {}
    set_data: dict[str, PreparedData] = {}
    order = [n.name for n in nodes]
    try:
        for p in prepared:
            view = p.view or load_model(p.source, registry.adapters, dtype=config.dtype, device=config.device,
                                        adapter=adapter, tokenizer=tokenizer)
            torch.manual_seed(config.seed)
            runner = ModelRunner(view=view, data=p.data, nodes=nodes, plan=p.plan, shape=p.shape,
                                 registry=registry, config=config, cache=cache,
                                 data_fingerprint=p.data.fingerprint() if p.data else None,
                                 model_fingerprint=view.fingerprint(), progress=progress)
            runner.run()
            records.append(_record_model(runner, p, order))
            tensors.update(runner.tensors)
            if keep_views:
                views[view.name] = view
                if p.data is not None:
                    set_data[view.name] = p.data
            p.view = None
    finally:
        if bar is not None:
            bar.close()
    model_set = _run_model_set(nodes, views, records, tensors, base_name=base_name, data=set_data,
                               shape=prepared[0].shape if prepared else None)
    record = RunRecord(
        tensorscope_version=registry.plugin_version("tensorscope-core") or "unknown",
        plugins=registry.plugins, config=config.model_dump(mode="json"), device=config.device,
        dtype=config.dtype, models=records, model_set=model_set,
        seconds_total=round(time.perf_counter() - started, 3))
    return Results(record, tensors)


analyze_models = analyze


class Analyzer:
    """A fixed analysis (metrics, parameters, config) applied to many models or model sets,
    so a sweep over checkpoints uses one definition of what is measured."""

    def __init__(self, metrics: str | Sequence[str] = "all", *, config: RunConfig | None = None,
                 params: Mapping[str, Mapping[str, Any]] | None = None, adapter: Adapter | None = None) -> None:
        self.metrics = metrics
        self.config = config or RunConfig()
        self.params = dict(params or {})
        self.adapter = adapter
        resolve(metrics, self.params, get_registry())  # fail on bad names and parameters now, not later

    def plan(self, models: ModelsArg, data: DataSpec | None = None, **kwargs: Any) -> list[ModelPlan]:
        return plan(models, data, self.metrics, config=self.config, params=self.params, adapter=self.adapter,
                    **kwargs)

    def run(self, models: ModelsArg, data: DataSpec | None = None, **kwargs: Any) -> Results:
        return analyze(models, data, self.metrics, config=self.config, params=self.params, adapter=self.adapter,
                       **kwargs)
