"""analyze(): load -> validate data -> plan every model -> run -> Results."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, closing, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import RunConfig, format_bytes
from .data import DataSpec, PreparedData, builtin_corpus, materialize, prepare_data
from .errors import ModelChangedError, PlanDoesNotFitError, UsageError
from .example_store import scratch_under
from .machine import Budget, check_device
from .metric import RunShape
from .models.adapters import Adapter
from .models.load import Dispatch, ModelSource, files_signature, load_model, modules_restored, release
from .models.names import short_names
from .models.view import ModelView
from .plugins import Registry, get_registry
from .results import Results
from .results.schema import ArtifactBytes, MetricResult, ModelRecord, RunRecord
from .results.store import ResultCache, check_writable_folder
from .run_settings import deterministic_mode, resolve_auto
from .scheduler.fitting import SetRungCost, check_pins, fit_model_plan, fit_set_plan, set_rung_costs
from .scheduler.graph import MetricNode, resolve
from .scheduler.ladder import Ladders, apply
from .scheduler.model_set import ModelSetRunner
from .scheduler.passes import PassCounter
from .scheduler.plan import ModelPlan, ModelSetPlan, set_passes
from .scheduler.run import ModelRunner, metric_result

ModelSpec = str | os.PathLike[str] | nn.Module | ModelSource
ModelsArg = ModelSpec | Sequence[ModelSpec] | Mapping[str, ModelSpec]
#: the model name the base of a model set (``base=``) takes
BASE_NAME = "base"
#: the folder under the cache dir where disk-backed stores keep their files while the run lasts
SCRATCH_DIR = "scratch"


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
    elif isinstance(models, Sequence):
        sources = [one(m) for m in models]
    else:
        raise UsageError(f"models must be a path, a module, a list of them or {{name: model}}, got "
                         f"{type(models).__name__}", 'pass e.g. analyze(["ckpt-100/", "ckpt-500/"])')
    if not sources:
        raise UsageError("no model was given", "pass at least one model: a folder, a weights file or a module")
    sources = short_names(sources, taken=() if base is None else (BASE_NAME,))
    _refuse_duplicate_names(sources)
    if base is None:
        return sources
    if any(s.display_name == BASE_NAME for s in sources):
        raise UsageError(f"a member of the model set is named '{BASE_NAME}', the name the base model (base=) takes",
                         f"rename that member, or pass it as the base instead of naming it '{BASE_NAME}'")
    return [dataclasses.replace(one(base), name=BASE_NAME), *sources]


def _refuse_duplicate_names(sources: Sequence[ModelSource]) -> None:
    """Results are keyed by model name: two members with one name would overwrite each other's."""
    seen: dict[str, int] = {}
    for src in sources:
        seen[src.display_name] = seen.get(src.display_name, 0) + 1
    twice = sorted(name for name, n in seen.items() if n > 1)
    if twice:
        raise UsageError(f"two models of this run are named {twice[0]!r} (two modules of one class, or one path "
                         "given twice): their results would overwrite each other",
                         "name the members: analyze({'a': model_a, 'b': model_b}) or, on the command line, "
                         "a=PATH b=PATH; leave out a path given twice")


@dataclass
class Prepared:
    """One model, loaded and checked, with its data and plan (nothing has run yet)."""

    source: ModelSource
    view: ModelView | None
    data: PreparedData | None
    shape: RunShape
    plan: ModelPlan
    weights_bytes: int
    set_costs: dict[str, list[SetRungCost]]
    set_passes: dict[str, dict[str, int]]
    #: the levels of the metrics' ladders this model's plan ended at
    ladders: Ladders
    #: the model's family and dimensions (what a record of it says when its run is lost)
    family: str = ""
    dims: dict[str, int] = dataclasses.field(default_factory=dict)
    #: the model files as planned (name, size, mtime): a run refuses files that changed since
    signature: tuple[tuple[str, int, int], ...] = ()


def _needs_data(nodes: Sequence[MetricNode]) -> bool:
    return any(set(n.cls.artifacts) - {"weights"} or (n.cls.scope == "model_set" and n.set_cls.uses_data(n.params))
               for n in nodes if n.planned)


def _prepare(src: ModelSource, data: DataSpec | None, nodes: Sequence[MetricNode], config: RunConfig,
             registry: Registry, adapter: Adapter | None, tokenizer: Any, members: Sequence[str],
             base_name: str | None, budget: Budget, floor: Ladders | None) -> Prepared:
    """Load one model and its data, and fit its plan into ``budget`` (from the ladder levels
    ``floor`` an earlier model of the run ended at)."""
    view = _load(src, registry, config, adapter, tokenizer)
    prepared_data = None
    notes = [dispatch_note(view)] if view.device_map is not None else []
    if view.from_config:
        notes.append("built from config.json on the meta device: no weights loaded, nothing can run"
                     + ("; placed as accelerate would place it" if view.device_map is not None else ""))
    if _needs_data(nodes):
        spec = data if data is not None else builtin_corpus()
        if data is None and view.tokenizer is None and view.from_config:
            spec = _synthetic_tokens(view, config)
            notes.append(f"no tokenizer and no data: planned on {len(spec)} sequences of {spec[0].numel()} "
                         "token ids (the built-in corpus's count, --max-length or 128 tokens)")
        prepared_data = prepare_data(spec, view, batch_size=config.batch_size, max_length=config.max_length,
                                     max_batches=config.max_batches)
    shape = RunShape(
        batch_size=config.batch_size,
        seq_len=prepared_data.max_seq_len if prepared_data else 0,
        n_batches=prepared_data.n_batches() if prepared_data else 0,
        n_sequences=prepared_data.n_sequences if prepared_data else 0,
        tasks=tuple(prepared_data.tasks) if prepared_data else (),
        seed=config.seed, batches=prepared_data.batch_layout() if prepared_data else ())
    _, plan, ladders = fit_model_plan(nodes, view, shape, registry, budget, config, floor)
    plan.notes = notes + plan.notes
    return Prepared(src, view, prepared_data, shape, plan, view.param_bytes, set_rung_costs(nodes, view, shape),
                    set_passes(nodes, view, shape, members, base_name), ladders,
                    family=view.family, dims=view.dims(), signature=files_signature(src))


def dispatch_note(view: ModelView) -> str:
    """What accelerate did with a dispatched model, for its plan and record."""
    devices = sorted({str(d) for d in (view.device_map or {}).values()})
    # the view's listing keeps a tied weight once (accelerate unties an offloaded one in the model's)
    offloaded = sum(p.numel() for n, p in view.named_parameters() if view.offloaded(n, p))
    return (f"dispatched over {', '.join(devices)} by accelerate (device_map): {offloaded:,} of {view.n_params:,} "
            "parameters offloaded; only metrics that support dispatch run")


def _load(src: ModelSource, registry: Registry, config: RunConfig, adapter: Adapter | None,
          tokenizer: Any) -> ModelView:
    """One model of the run, on the run's device and dtype, or placed by accelerate (``device_map``)."""
    dispatch = None if config.device_map is None else Dispatch(config.device_map, config.max_memory,
                                                                config.offload_dir, config.dtype)
    return load_model(src, registry.adapters, dtype=config.dtype, device=config.device, adapter=adapter,
                      tokenizer=tokenizer, dispatch=dispatch)


def _synthetic_tokens(view: ModelView, config: RunConfig) -> list[torch.Tensor]:
    """Token ids shaped like a default run (a config-only model has no tokenizer to read the corpus)."""
    vocab = int(getattr(view.model.config, "vocab_size", 2))
    gen = torch.Generator().manual_seed(config.seed)
    length = config.max_length or 128
    return [torch.randint(0, vocab, (length,), generator=gen) for _ in builtin_corpus()]


def _reads_weights(nodes: Sequence[MetricNode]) -> bool:
    """Whether a runnable model-set metric reads the members' weights (else they are released)."""
    return any(n.set_cls.reads_weights for n in nodes if n.cls.scope == "model_set" and n.planned)


def _releasable(src: ModelSource) -> bool:
    """A member loaded by the run (from a path) can have its weights released; a module the
    caller passed stays as it is (its memory is the caller's)."""
    return isinstance(src.source, (str, os.PathLike))


def _set_plan(nodes: Sequence[MetricNode], prepared: Sequence[Prepared], config: RunConfig,
              budget: Budget) -> tuple[list[MetricNode], ModelSetPlan | None]:
    """The model-set stage's plan (every member sized, the largest state per rung), fitted into
    ``budget``; ``nodes`` come back with the set metrics' rungs."""
    costs: dict[str, list[SetRungCost]] = {}
    for p in prepared:
        for name, rungs in p.set_costs.items():
            old = costs.get(name)
            costs[name] = rungs if old is None else [
                SetRungCost(c.rung, max(c.state, o.state), max(c.transient, o.transient), max(c.results, o.results))
                for c, o in zip(rungs, old, strict=True)]
    keep = _reads_weights(nodes)
    kept = [p.weights_bytes if keep or not _releasable(p.source) else 0 for p in prepared]
    return fit_set_plan(nodes, costs, [p.plan for p in prepared], kept, budget, config,
                        prepared[0].set_passes if prepared else {})


def _prepare_all(sources: Sequence[ModelSource], data: DataSpec | None, nodes: list[MetricNode],
                 config: RunConfig, registry: Registry, adapter: Adapter | None, tokenizer: Any,
                 base_name: str | None, budget: Budget, *, keep_last: bool,
                 refuse: bool) -> tuple[list[Prepared], list[MetricNode]]:
    """Every model loaded, checked and planned in turn (the ladder levels only go down from one to the
    next), and the run's nodes at the levels the last one ended at. A view loaded from a path is
    dropped once planned (only one model is held at a time) but the last, with ``keep_last``. With
    ``refuse``, a plan that does not fit even with every metric left out raises PlanDoesNotFitError."""
    names = [s.display_name for s in sources]
    prepared: list[Prepared] = []
    floor = None
    for i, src in enumerate(sources):
        p = _prepare(src, data, nodes, config, registry, adapter, tokenizer, names, base_name, budget, floor)
        floor = p.ladders
        if refuse and not p.plan.fits:
            raise PlanDoesNotFitError(
                f"the plan for {p.plan.model} needs {format_bytes(p.plan.peak_bytes)}, over the budget of "
                f"{format_bytes(budget.nbytes)} ({budget.source}) even at micro-batch {p.plan.micro_batch}"
                + (" with strict_budget" if config.strict_budget else " with every metric left out that could be"),
                "raise memory_budget, lower batch_size or max_length, or ask for fewer metrics"
                + ("" if config.strict_budget else " (the weights and one batch's activations must fit)"),
                p.plan.render())
        if (i < len(sources) - 1 or not keep_last) and isinstance(src.source, (str, os.PathLike)):
            p.view = None
        prepared.append(p)
    return prepared, (apply(nodes, floor) if floor is not None else list(nodes))


def plan(models: ModelsArg, data: DataSpec | None = None, metrics: str | Sequence[str] = "all", *,
         config: RunConfig | None = None, params: Mapping[str, Mapping[str, Any]] | None = None,
         base_config: str | None = None, adapter: Adapter | None = None, tokenizer: Any = None,
         base: ModelSpec | None = None, registry: Registry | None = None) -> list[ModelPlan | ModelSetPlan]:
    """The pass and memory plan of each model (the base first, when given), then the model-set
    stage's when model-set metrics are asked for, without running any pass."""
    registry = registry or get_registry()
    nodes = resolve(metrics, params or {}, registry)
    sources = [dataclasses.replace(s, config_only_ok=True) for s in _sources(models, base_config, base)]
    config, _ = resolve_auto(config or RunConfig(), sources)
    check_pins(nodes, config)
    budget = config.budget()
    with modules_restored(sources):
        prepared, final = _prepare_all(sources, data, nodes, config, registry, adapter, tokenizer,
                                       BASE_NAME if base is not None else None, budget, keep_last=False,
                                       refuse=False)
        for p in prepared[:-1]:
            if p.ladders.levels != prepared[-1].ladders.levels or p.ladders.left_out != prepared[-1].ladders.left_out:
                p.plan = _replan(p, final, registry, adapter, tokenizer, config, budget)
    _, set_plan = _set_plan(final, prepared, config, budget)
    return [p.plan for p in prepared] + ([set_plan] if set_plan is not None else [])


def _replan(p: Prepared, nodes: Sequence[MetricNode], registry: Registry, adapter: Adapter | None, tokenizer: Any,
            config: RunConfig, budget: Budget) -> ModelPlan:
    """``p``'s plan again with the run's final rungs (a later model of the run stepped further down)."""
    view = p.view or _load(p.source, registry, config, adapter, tokenizer)
    _, plan, _ = fit_model_plan(nodes, view, p.shape, registry, budget, config.model_copy(update={"rungs": {}}))
    return plan


def _given_path(source: ModelSource) -> str | None:
    """Where a model given by path was read from, kept beside its short name (a module: None)."""
    return None if isinstance(source.source, nn.Module) else source.where


def _record_model(runner: ModelRunner, prepared: Prepared, order: Sequence[str]) -> ModelRecord:
    view = runner.view
    d = prepared.data
    notes = list(d.notes) if d else []
    if view.device_map is not None:
        notes.append(dispatch_note(view))
    return ModelRecord(
        name=view.name, source=_given_path(prepared.source), family=view.family,
        fingerprint=runner.model_fingerprint, dims=view.dims(), data_fingerprint=runner.data_fingerprint,
        n_sequences=len(d.used_sequences()) if d else 0,
        n_tokens=sum(len(s) for s in d.used_sequences()) if d else 0,
        passes=dict(runner.passes), model_calls=dict(sorted(runner.counter.calls.items())), notes=notes,
        artifact_bytes={k: ArtifactBytes(declared=runner.artifact_declared.get(k, 0), held=v)
                        for k, v in sorted(runner.artifact_bytes.items())},
        metrics={name: runner.results[name] for name in order if name in runner.results})


def analyze(models: ModelsArg, data: DataSpec | None = None, metrics: str | Sequence[str] = "all", *,
            config: RunConfig | None = None, params: Mapping[str, Mapping[str, Any]] | None = None,
            base_config: str | None = None, adapter: Adapter | None = None, tokenizer: Any = None,
            base: ModelSpec | None = None, registry: Registry | None = None) -> Results:
    """Compute ``metrics`` on each model in one shared run per model.

    ``models``: a path, a module, a list of them, or ``{name: model}``. ``base``: the base
    model of a model set (fine-tunes of it in ``models``); it runs first, like every other
    model, under the name ``base``, and model-set metrics see it as ``self.base_name``. ``data``: texts, a
    .txt/.jsonl path, token id tensors, a DataLoader, or ``{task: data}``; None uses the
    built-in corpus. Every model is loaded, its data checked and its memory planned
    before any pass runs: a plan over ``config.memory_budget`` raises PlanDoesNotFitError.
    ``registry``: the plugins to use (``tensorscope_core.testing.temporary_plugin`` builds one
    with extra plugins); default: every installed plugin.
    """
    registry = registry or get_registry()
    nodes = resolve(metrics, params or {}, registry)  # names and parameters first: nothing is read yet
    sources = _sources(models, base_config, base)
    config, auto_notes = resolve_auto(config or RunConfig(), sources)
    check_device(config.device)
    check_pins(nodes, config)
    if config.executor == "ray":
        from .ray_sweep import import_ray

        import_ray()  # missing: say so before any model loads
    data = materialize(data)
    with modules_restored(sources), deterministic_mode(config.deterministic):
        results = _analyze(sources, data, nodes, config, registry, adapter, tokenizer,
                           BASE_NAME if base is not None else None)
    for record in results.record.models:
        record.notes[:0] = auto_notes
    return results


@dataclass
class MemberRun:
    """What one member's per-model stage hands to the run: its record, tensors, cache keys and fingerprints."""

    record: ModelRecord
    tensors: dict[str, torch.Tensor]
    keys: dict[str, str]
    fingerprints: tuple[str, str | None]
    #: why the member's stage was lost as a whole (its task failed on every try); None: it ran
    failure: str | None = None


def run_member(p: Prepared, nodes: Sequence[MetricNode], registry: Registry, config: RunConfig,
               adapter: Adapter | None, tokenizer: Any, budget: Budget, cache: ResultCache | None,
               progress: Callable[[str, int, str], Any] | None) -> tuple[MemberRun, ModelView]:
    """Run one member's plan at the run's final rungs (the same on every executor)."""
    if p.view is None and files_signature(p.source) != p.signature:
        raise ModelChangedError(f"the files of {p.source.display_name} changed after the run was planned",
                                "run again once the checkpoint is written completely (the finished metrics of "
                                "the other models are kept in the cache)")
    view = p.view or _load(p.source, registry, config, adapter, tokenizer)
    _, p.plan, _ = fit_model_plan(nodes, view, p.shape, registry, budget,
                                  config.model_copy(update={"rungs": {}}))  # the run's final rungs
    torch.manual_seed(config.seed)
    runner = ModelRunner(view=view, data=p.data, nodes=nodes, plan=p.plan, shape=p.shape,
                         registry=registry, config=config, cache=cache,
                         data_fingerprint=p.data.fingerprint() if p.data else None,
                         model_fingerprint=view.fingerprint(), progress=progress,
                         counter=PassCounter([type(view.model)]))
    runner.run()
    record = _record_model(runner, p, [n.name for n in nodes])
    fingerprints = (runner.model_fingerprint, runner.data_fingerprint)
    return MemberRun(record, runner.tensors, dict(runner.keys), fingerprints), view


def lost_member(p: Prepared, nodes: Sequence[MetricNode], reason: str, error_type: str) -> MemberRun:
    """The record of a member whose whole stage was lost: every per-model metric an error naming why."""
    metrics = {n.name: metric_result(n, "error", reason=reason, error_type=error_type)
               for n in nodes if n.cls.scope == "model"}
    record = ModelRecord(name=p.source.display_name, source=_given_path(p.source), family=p.family, fingerprint="",
                         dims=p.dims,
                         notes=[reason], metrics=metrics)
    return MemberRun(record, {}, {}, ("", None), failure=reason)


def _progress_bar(config: RunConfig, prepared: Sequence[Prepared], nodes: Sequence[MetricNode]) -> Any:
    """One bar over the whole run (None without ``config.progress``): each member's batches per stage and
    one step per metric result, then one per model-set metric; its postfix names the metric finalizing."""
    if not config.progress:
        return None
    from tqdm.auto import tqdm

    per_model = sum(n.cls.scope == "model" for n in nodes)
    data_stages = len({n.stage for n in nodes if n.cls.scope == "model" and set(n.cls.artifacts) - {"weights"}})
    total = sum(p.shape.n_batches * data_stages + per_model for p in prepared) \
        + sum(n.cls.scope == "model_set" for n in nodes)
    return tqdm(total=total, desc="analysing", unit="step")


def _bar_progress(bar: Any) -> Callable[[str, int, str], None] | None:
    """The runners' ``progress`` callback moving ``bar``."""
    if bar is None:
        return None

    def progress(run: str, steps: int, doing: str) -> None:
        if doing:
            bar.set_postfix_str(f"{'model set' if run == '*' else run}: {doing}")
        bar.update(steps)
    return progress


def _run_members_here(prepared: Sequence[Prepared], nodes: Sequence[MetricNode], registry: Registry,
                      config: RunConfig, adapter: Adapter | None, tokenizer: Any, budget: Budget,
                      cache: ResultCache | None, bar: Any,
                      keep_views: bool) -> tuple[list[MemberRun], dict[str, ModelView]]:
    """The local executor: one member after another in this process (views kept for the model-set stage)."""
    progress = _bar_progress(bar)
    release_weights = keep_views and not _reads_weights(nodes)
    runs: list[MemberRun] = []
    views: dict[str, ModelView] = {}
    for p in prepared:
        try:
            run, view = run_member(p, nodes, registry, config, adapter, tokenizer, budget, cache, progress)
        except ModelChangedError as exc:
            if config.fail_fast:
                raise
            runs.append(lost_member(p, nodes, f"{exc.problem}: {exc.fix}", type(exc).__name__))
            continue
        runs.append(run)
        if keep_views:
            if release_weights and _releasable(p.source):
                release(view)
            views[view.name] = view
        p.view = None
    return runs, views


def _set_views(prepared: Sequence[Prepared], nodes: Sequence[MetricNode], registry: Registry, config: RunConfig,
               adapter: Adapter | None, tokenizer: Any) -> dict[str, ModelView]:
    """The members loaded here again for the model-set stage (their per-model stages ran elsewhere)."""
    views = {}
    for p in prepared:
        view = _load(p.source, registry, config, adapter, tokenizer)
        if not _reads_weights(nodes) and _releasable(p.source):
            release(view)
        views[view.name] = view
    return views


def _remove_if_empty(folders: Sequence[Path]) -> None:
    """Remove the folders a run made for itself and left empty (a failed run leaves nothing behind)."""
    for folder in folders:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _analyze(sources: list[ModelSource], data: DataSpec | None, nodes: list[MetricNode], config: RunConfig,
             registry: Registry, adapter: Adapter | None, tokenizer: Any, base_name: str | None = None) -> Results:
    started = time.perf_counter()
    budget = config.budget()
    on_ray = config.executor == "ray"
    prepared, nodes = _prepare_all(sources, data, nodes, config, registry, adapter, tokenizer, base_name, budget,
                                   keep_last=not on_ray, refuse=True)
    nodes, set_plan = _set_plan(nodes, prepared, config, budget)
    if set_plan is not None and not set_plan.fits:
        raise PlanDoesNotFitError(
            f"the model-set stage needs {format_bytes(set_plan.peak_bytes)} (every member's weights stay loaded "
            f"for it), over the budget of {format_bytes(budget.nbytes)} ({budget.source})",
            "raise memory_budget, analyse fewer models in one run, or drop the model-set metrics",
            set_plan.render())
    if config.cache_dir:
        check_writable_folder(Path(config.cache_dir), "cache dir", "cache_dir (CLI: --out, or --no-cache)")
    cache = ResultCache(Path(config.cache_dir), refresh=config.force_recompute) if config.cache_dir else None
    scratch = ExitStack()  # disk-backed stores write under the run's cache dir, and remove their files
    if config.cache_dir:
        cache_dir = Path(config.cache_dir)
        made = [d for d in (cache_dir, cache_dir / SCRATCH_DIR) if not d.exists()]
        scratch.enter_context(scratch_under(cache_dir / SCRATCH_DIR))
        scratch.callback(_remove_if_empty, [cache_dir / SCRATCH_DIR, *[d for d in made if d == cache_dir]])
    bar = _progress_bar(config, prepared, nodes)
    with scratch, (closing(bar) if bar is not None else nullcontext()):
        if on_ray:
            from .ray_sweep import run_members_on_ray

            runs = run_members_on_ray(prepared, nodes, registry, config, adapter, tokenizer, budget, bar)
            lost_any = any(run.failure is not None for run in runs)
            views = _set_views(prepared, nodes, registry, config, adapter, tokenizer) \
                if set_plan and not lost_any else {}
        else:
            runs, views = _run_members_here(prepared, nodes, registry, config, adapter, tokenizer, budget,
                                            cache, bar, keep_views=set_plan is not None)
        tensors = {k: v for run in runs for k, v in run.tensors.items()}
        model_set: dict[str, MetricResult] = {}
        lost = next((run for run in runs if run.failure is not None), None)
        if set_plan is not None and lost is not None:
            reason = f"member {lost.record.name} was lost: {lost.failure}"
            model_set = {n.name: metric_result(n, "skipped", reason=reason)
                         for n in nodes if n.cls.scope == "model_set"}
        elif set_plan is not None:
            set_runner = ModelSetRunner(
                registry=registry, config=config, cache=cache, tensors=tensors, nodes=nodes, views=views,
                per_model={run.record.name: run.record.metrics for run in runs},
                member_keys={run.record.name: run.keys for run in runs},
                fingerprints={run.record.name: run.fingerprints for run in runs},
                shape=prepared[0].shape, declared=set_plan.declared_state, base_name=base_name,
                data={p.source.display_name: p.data for p in prepared if p.data is not None},
                counter=PassCounter({type(v.model) for v in views.values()}), progress=_bar_progress(bar))
            model_set = set_runner.run()
        record = RunRecord(
            tensorscope_version=registry.plugin_version("tensorscope-core") or "unknown",
            plugins=registry.plugins, config=config.model_dump(mode="json"), device=config.device,
            dtype=config.dtype, models=[run.record for run in runs], model_set=model_set,
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

    def plan(self, models: ModelsArg, data: DataSpec | None = None, **kwargs: Any) -> list[ModelPlan | ModelSetPlan]:
        return plan(models, data, self.metrics, config=self.config, params=self.params, adapter=self.adapter,
                    **kwargs)

    def run(self, models: ModelsArg, data: DataSpec | None = None, **kwargs: Any) -> Results:
        return analyze(models, data, self.metrics, config=self.config, params=self.params, adapter=self.adapter,
                       **kwargs)
