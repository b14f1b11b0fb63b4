"""The memory and pass plan of one model, made and checked before anything runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from pydantic import BaseModel

from ..artifacts import PARAM_GRAD, ArtifactSpec, Request, act_bytes, forward_act_bytes
from ..config import format_bytes
from ..errors import PluginError
from ..metric import RunShape
from ..models.view import ModelView
from ..plugins import Registry
from ..results.schema import Cost
from .graph import MetricNode
from .passes import check_declared


@dataclass
class PassPlan:
    """One pass over the data (or over the weights) serving a stage's metrics together."""

    stage: int
    kind: str  # "weights" | "data" | "forward" | "forward+backward"
    metrics: list[str]
    artifacts: list[str]
    artifact_bytes: int = 0
    activation_bytes: int = 0
    state_bytes: int = 0
    #: the largest working memory one of the pass's metrics allocates in its update or finalize
    transient_bytes: int = 0
    #: the largest working memory one of the pass's metrics allocates in its finalize only (artifacts freed)
    finalize_bytes: int = 0
    #: the most the pass's metrics hold while they finalize, one at a time in ``metrics`` order: the
    #: states not yet freed, the results made so far and one finalize's working memory (``finalize_order``)
    finalizing_bytes: int = 0
    #: the tensors among the results of the metrics of every pass before this one, kept to the end
    results_bytes: int = 0
    peak_bytes: int = 0
    #: whole-model passes the stage's metrics and artifacts make themselves over the run:
    #: who (a metric, or ``artifact:NAME``) -> kind -> count
    own_passes: dict[str, dict[str, int]] = field(default_factory=dict)
    #: activations the heaviest of those passes keeps (a replay of one batch)
    own_pass_bytes: int = 0


@dataclass
class ModelPlan:
    model: str
    passes: list[PassPlan]
    weights_bytes: int
    micro_batch: int
    batch_size: int
    budget_bytes: int
    declared_state: dict[str, int] = field(default_factory=dict)
    #: metric -> declared working memory of its update / finalize (metrics with none: absent)
    declared_transient: dict[str, int] = field(default_factory=dict)
    #: metric -> declared bytes of the tensors among its results (metrics with none: absent)
    declared_results: dict[str, int] = field(default_factory=dict)
    #: metric -> declared working memory of its finalize alone (metrics with none: absent)
    declared_finalize: dict[str, int] = field(default_factory=dict)
    #: where the budget came from (``memory_budget``, or the device's free memory)
    budget_source: str = "memory_budget"
    #: metric -> the ladder rung it runs at and what that costs in accuracy (metrics as asked: absent)
    rungs: dict[str, str] = field(default_factory=dict)
    #: metric -> why it was left out of the run for memory
    left_out: dict[str, str] = field(default_factory=dict)
    #: what the reader of the plan should know (e.g. planned from a config alone)
    notes: list[str] = field(default_factory=list)
    #: the result tensors the run copies to the host as each metric finishes (a run on an accelerator);
    #: 0 where they stay in the budget's memory (a run on the CPU)
    host_results_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        return max((p.peak_bytes for p in self.passes), default=self.weights_bytes)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data.update(peak_bytes=self.peak_bytes, fits=self.fits)
        return data

    def render(self) -> str:
        lines = [f"plan for {self.model}: batch {self.batch_size}, micro-batch {self.micro_batch}, "
                 f"weights {format_bytes(self.weights_bytes)}, budget {format_bytes(self.budget_bytes)} "
                 f"({self.budget_source})", *(f"  note: {n}" for n in self.notes)]
        for p in self.passes:
            lines.append(f"  stage {p.stage} {p.kind:<17} peak {format_bytes(p.peak_bytes):>10}  "
                         f"(artifacts {format_bytes(p.artifact_bytes)}, "
                         f"activations {format_bytes(p.activation_bytes)}, "
                         f"metric state {format_bytes(p.state_bytes)}, "
                         f"metric working memory {format_bytes(max(p.transient_bytes, p.finalize_bytes))}"
                         + (f", results kept {format_bytes(p.results_bytes)}" if p.results_bytes else "") + ")")
            lines.append(f"      artifacts: {', '.join(p.artifacts) or '-'}")
            lines.append(f"      metrics:   {', '.join(p.metrics)}")
            if p.own_passes:
                lines.append(f"      own passes (activations {format_bytes(p.own_pass_bytes)}): " + "; ".join(
                    f"{who} " + ", ".join(f"{kind} x{n}" for kind, n in kinds.items())
                    for who, kinds in p.own_passes.items()))
        lines.extend(self._by_metric())
        lines.extend(render_choices(self.rungs, self.left_out))
        if self.host_results_bytes:
            lines.append(f"  results copied to the host's memory as each metric finishes: "
                         f"{format_bytes(self.host_results_bytes)} (not in the device's budget)")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"  declared peak {format_bytes(self.peak_bytes)}: {verdict} in {format_bytes(self.budget_bytes)}")
        return "\n".join(lines)


    def _by_metric(self, shown: int = 8) -> list[str]:
        """The metrics that declare the most memory, so a reader of a plan that does not fit sees what
        to drop or step down (state is held to the end of the run; working memory only while it runs)."""
        def working(name: str) -> int:
            return max(self.declared_transient.get(name, 0), self.declared_finalize.get(name, 0))

        def total(name: str) -> int:
            return self.declared_state.get(name, 0) + working(name) + self.declared_results.get(name, 0)

        named = set(self.declared_state) | set(self.declared_transient) | set(self.declared_finalize)
        ranked = sorted((n for n in named if total(n) > 0), key=lambda n: (-total(n), n))
        if not ranked:
            return []
        lines = ["  largest declared memory by metric (state held / working memory while it runs / results kept):"]
        lines += [f"      {n:<36} {format_bytes(self.declared_state.get(n, 0)):>10} / "
                  f"{format_bytes(working(n)):>10} / "
                  f"{format_bytes(self.declared_results.get(n, 0)):>10}" for n in ranked[:shown]]
        if len(ranked) > shown:
            lines.append(f"      ... {len(ranked) - shown} more, each under {format_bytes(total(ranked[shown]))}")
        return lines


def render_choices(rungs: dict[str, str], left_out: dict[str, str]) -> list[str]:
    """The plan's lines for metrics stepped down their ladders and those left out."""
    lines = [f"  rung {name}: {choice}" for name, choice in rungs.items()]
    return lines + [f"  LEFT OUT {name}: {why.removeprefix('left out for memory: ')}" for name, why in left_out.items()]


def closure(names: Sequence[str], registry: Registry) -> list[ArtifactSpec]:
    """The artifacts named plus those they require, in dependency order."""
    seen: dict[str, ArtifactSpec] = {}

    def visit(name: str) -> None:
        if name in seen:
            return
        spec = registry.artifacts[name]
        for req in spec.requires:
            visit(req)
        seen[name] = spec

    for n in names:
        visit(n)
    return list(seen.values())


def merged_requests(specs: Sequence[ArtifactSpec], consumers: Sequence[MetricNode],
                    view: ModelView) -> dict[str, Request]:
    """Each parameterised artifact's merged request over the pass's ``consumers`` (the union
    ``ArtifactSpec.merge`` makes of what each asked in ``artifact_requests``)."""
    asked: dict[str, list[Request]] = {}
    for node in consumers:
        try:
            wanted = node.model_cls.artifact_requests(node.params, view)
        except Exception:  # e.g. parameters that match nothing: the metric fails on its own when set up
            continue
        for name, request in wanted.items():
            asked.setdefault(name, []).append(request)
    merged: dict[str, Request] = {}
    for spec in specs:
        requests = [r for r in asked.pop(spec.name, []) if r]
        if spec.merge is not None:
            merged[spec.name] = spec.merge(requests)
        elif requests:
            raise PluginError(f"artifact '{spec.name}' takes no requests, and a metric of this pass asked it "
                              f"{requests[0]!r}", "ask parameters of parameterised artifacts (ArtifactSpec.merge) only")
    if asked:
        raise PluginError(f"metrics asked artifacts they do not read: {sorted(asked)}",
                          "list every artifact a metric requests in its `artifacts`")
    return merged


def pass_kind(specs: Sequence[ArtifactSpec]) -> str:
    kinds = {s.pass_kind for s in specs}
    if "backward" in kinds:
        return "forward+backward"
    if "forward" in kinds:
        return "forward"
    if "data" in kinds:
        return "data"
    return "weights"


def _activations(view: ModelView, kind: str, rows: int, seq: int) -> int:
    """Activation bytes one pass of ``kind`` over ``rows`` sequences keeps."""
    if kind in ("forward+backward", "backward", "replay_backward", "sampled_backward", "per_example_backward"):
        return act_bytes(view, rows, seq)  # what autograd keeps for the backward
    if kind in ("forward", "replay_forward"):
        return forward_act_bytes(view, rows, seq)
    return 0


def _pass_peak(view: ModelView, p: PassPlan, micro: int, seq: int, specs: Sequence[ArtifactSpec],
               shape: RunShape, requests: dict[str, Request]) -> None:
    p.artifact_bytes = sum(s.bytes_for(view, shape.batch_size, seq, requests.get(s.name, {})) for s in specs)
    p.activation_bytes = _activations(view, p.kind, micro, seq)
    if p.kind == "forward" and any(s.name == "logits" for s in specs):  # the kept logits are the forward's own
        p.activation_bytes -= micro * seq * view.vocab_size * view.dtype_bytes
    if any(s.name == PARAM_GRAD for s in specs):  # a tied embedding's two gradients beside their sum
        p.activation_bytes += 2 * view.tied_embedding_bytes
    if "backward" in p.kind and view.device_map is not None:
        # accelerate loads an offloaded weight for its module's call and drops it after, but autograd keeps
        # the loaded tensor (a linear layer saves its weight for its input's gradient) until the backward
        # reaches it: for a shared backward every weight is on the run device, not one block's
        p.activation_bytes += view.every_param_bytes - view.param_bytes
    micro_batches = shape.n_batches * -(-shape.batch_size // max(micro, 1))
    for spec in specs:
        if spec.own_passes is not None and shape.n_batches:
            own = spec.own_passes(view, micro, seq, requests.get(spec.name, {}))
            p.own_passes[f"artifact:{spec.name}"] = {k: v * micro_batches for k, v in own.items() if v}
    # A metric's own passes replay whole batches after the shared pass, one at a time; an artifact's
    # run inside the shared pass per micro-batch, and its declared bytes already hold what they keep.
    p.own_pass_bytes = max((_activations(view, kind, shape.batch_size, seq)
                            for who, kinds in p.own_passes.items() if not who.startswith("artifact:")
                            for kind in kinds), default=0)
    transient = max((s.transient_for(view, micro, seq, requests.get(s.name, {})) for s in specs), default=0)
    p.activation_bytes += transient  # a producer's own backward runs while the shared pass's activations are held
    # a metric's update / finalize works after the pass's activations are freed, one metric at a time
    working = max(p.activation_bytes, p.own_pass_bytes, p.transient_bytes)
    # the pass's metrics finalize one at a time once its artifacts are freed (``finalize_order``); a
    # pass over the weights has no update, only finalize
    updating = 0 if p.kind == "weights" else p.artifact_bytes + working + p.state_bytes
    during = max(updating, p.finalizing_bytes)
    p.peak_bytes = view.param_bytes + during + p.results_bytes


def _declared_passes(node: MetricNode, view: ModelView, shape: RunShape) -> dict[str, int]:
    """A per-model metric's own passes; a declaration that fails counts none (the metric's
    own run reports the error)."""
    try:
        return check_declared(node.model_cls.own_passes(node.params, view, shape), node.name)
    except Exception:
        return {}


#: a declared cost's memo key: the metric, its parameters and those of the metrics it reads
CostKey = tuple[str, str, tuple[tuple[str, str], ...]]


def dependency_params(node: MetricNode, nodes: Sequence[MetricNode]) -> dict[str, BaseModel]:
    """The parameters (at their rungs) of the metrics among ``nodes`` that ``node`` reads."""
    by_name = {n.name: n.params for n in nodes}
    return {d: by_name[d] for d in node.needs if d in by_name}


def cost_key(node: MetricNode, deps: dict[str, BaseModel]) -> CostKey:
    return node.name, node.params.model_dump_json(), tuple((d, p.model_dump_json()) for d, p in deps.items())


@dataclass(frozen=True)
class Finalizing:
    """What one metric holds around its finalize: its state before, the tensors of its results after,
    and the most it holds while finalize runs (at least its results)."""

    name: str
    state: int
    results: int
    during: int


def finalize_order(metrics: Sequence[Finalizing]) -> tuple[list[str], int]:
    """The order a pass's metrics finalize in, and the most they hold meanwhile.

    Finalize runs one metric at a time; each frees its state and keeps its results. Before metric j
    the pass holds every state not yet freed and the results made so far, then j's finalize adds
    ``during``. The peak is smallest (the classic rule for jobs that each need a peak and leave a net
    change) when the metrics that free more than they keep go first, smallest ``during`` first, and
    the rest after, largest ``during - net change`` first."""
    freeing = sorted((m for m in metrics if m.results <= m.state), key=lambda m: m.during)
    keeping = sorted((m for m in metrics if m.results > m.state), key=lambda m: m.results - m.state - m.during)
    held, peak = sum(m.state for m in metrics), 0
    for m in (*freeing, *keeping):
        peak = max(peak, held + m.during)
        held += m.results - m.state
    return [m.name for m in (*freeing, *keeping)], peak


def make_plan(nodes: Sequence[MetricNode], view: ModelView, shape: RunShape, registry: Registry,
              budget_bytes: int, min_micro_batch: int = 1,
              memo: dict[CostKey, tuple[Cost, dict[str, int]]] | None = None,
              results_on_host: bool = False) -> ModelPlan:
    """Group runnable metrics into passes by stage and find the largest micro-batch that fits.

    ``memo``: declared costs and own passes by (metric, parameters, its dependencies' parameters), kept
    between the calls of one fitting (each tries many combinations of rungs on the same model).
    ``results_on_host``: the run's device is not the CPU, so each result tensor is copied to the host as
    its metric finishes (``to_values``): the device holds it only during that finalize."""
    runnable = [n for n in nodes if n.planned and n.cls.scope == "model"
                and (view.device_map is None or n.cls.supports_dispatch)]
    memo = {} if memo is None else memo
    keys: dict[str, CostKey] = {}
    for n in runnable:
        deps = dependency_params(n, nodes)
        keys[n.name] = key = cost_key(n, deps)
        if key not in memo:
            seen = shape.with_dependencies(deps)
            memo[key] = (n.model_cls.cost(n.params, view, seen), _declared_passes(n, view, seen))
    costs = {name: memo[key][0] for name, key in keys.items()}
    declared = {name: c.state_bytes for name, c in costs.items()}
    working = {name: c.transient_bytes for name, c in costs.items() if c.transient_bytes}
    results = {name: c.result_bytes for name, c in costs.items() if c.result_bytes}
    finalizing = {name: c.finalize_bytes for name, c in costs.items() if c.finalize_bytes}
    own = {name: memo[key][1] for name, key in keys.items()}

    def replays(name: str) -> int:  # the activations of a metric's own passes, made from its finalize
        return max((_activations(view, kind, shape.batch_size, shape.seq_len) for kind in own[name]), default=0)

    def pass_of(stage: int, kind: str, names: list[str], artifacts: list[str]) -> PassPlan:
        kept = {m: 0 if results_on_host else results.get(m, 0) for m in names}
        order, during = finalize_order([Finalizing(m, declared[m], kept[m], max(
            finalizing.get(m, 0), working.get(m, 0), results.get(m, 0), replays(m))) for m in names])
        return PassPlan(stage, kind, order, artifacts, state_bytes=sum(declared[m] for m in names),
                        transient_bytes=max((working.get(m, 0) for m in names), default=0),
                        finalize_bytes=max((finalizing.get(m, 0) for m in names), default=0),
                        finalizing_bytes=during, own_passes={m: own[m] for m in names if own[m]})

    passes: list[tuple[PassPlan, list[ArtifactSpec], dict[str, Request]]] = []
    for stage in sorted({n.stage for n in runnable}):
        members = [n for n in runnable if n.stage == stage]
        weights_only = [n.name for n in members if not (set(n.cls.artifacts) - {"weights"})]
        data_metrics = [n for n in members if n.name not in weights_only]
        if weights_only:
            passes.append((pass_of(stage, "weights", weights_only, ["weights"]), [], {}))
        if data_metrics:
            wanted = sorted({a for n in data_metrics for a in n.cls.artifacts} - {"weights"})
            specs = closure(wanted, registry)
            passes.append((pass_of(stage, pass_kind(specs), [n.name for n in data_metrics], [s.name for s in specs]),
                           specs, merged_requests(specs, data_metrics, view)))
    kept = 0  # a pass's metrics finalize at its end; their results stay through every later pass
    for p, _, _ in passes:
        p.results_bytes = kept
        kept += 0 if results_on_host else sum(results.get(m, 0) for m in p.metrics)
    micro = shape.batch_size
    while True:
        for p, specs, requests in passes:
            p.own_passes = {k: v for k, v in p.own_passes.items() if not k.startswith("artifact:")}
            _pass_peak(view, p, micro, shape.seq_len, specs, shape, requests)
        plan = ModelPlan(view.name, [p for p, _, _ in passes], view.param_bytes, micro, shape.batch_size,
                         budget_bytes, declared, working, results, finalizing,
                         host_results_bytes=sum(results.values()) if results_on_host else 0)
        if plan.fits or micro <= min_micro_batch:
            return plan
        micro = max(min_micro_batch, micro // 2)


@dataclass
class ModelSetPlan:
    """The model-set stage: metrics over every member, run after all members' own passes.

    When a model-set metric reads weights, every member's weights stay loaded from its own run to
    the end of this stage, so the peak while member i runs is its own peak plus the weights of the
    members before it; otherwise ``member_weights`` are 0 (released) but for modules the caller
    passed in, which stay as they are.
    """

    metrics: list[str]
    members: list[str]
    member_weights: list[int]
    member_peaks: list[int]
    budget_bytes: int
    declared_state: dict[str, int] = field(default_factory=dict)
    #: working memory each model-set metric's compute_set allocates and frees (one runs at a time)
    declared_transient: dict[str, int] = field(default_factory=dict)
    #: bytes of the tensors among each model-set metric's results, kept to the end of the run
    declared_results: dict[str, int] = field(default_factory=dict)
    #: whole-model passes each model-set metric makes itself over all members: metric -> kind -> count
    own_passes: dict[str, dict[str, int]] = field(default_factory=dict)
    model: str = "model set"
    budget_source: str = "memory_budget"
    rungs: dict[str, str] = field(default_factory=dict)
    left_out: dict[str, str] = field(default_factory=dict)

    @property
    def weights_bytes(self) -> int:
        return sum(self.member_weights)

    @property
    def state_bytes(self) -> int:
        return sum(self.declared_state.values())

    @property
    def transient_bytes(self) -> int:
        return max(self.declared_transient.values(), default=0)

    @property
    def stage_bytes(self) -> int:
        """The model-set stage's own peak above the members' weights: every set metric's state and results
        and the largest one's working memory."""
        return self.state_bytes + self.transient_bytes + sum(self.declared_results.values())

    @property
    def peak_bytes(self) -> int:
        during_members = [peak + sum(self.member_weights[:i]) for i, peak in enumerate(self.member_peaks)]
        return max([self.weights_bytes + self.stage_bytes, *during_members])

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes

    def to_dict(self) -> dict[str, object]:
        data = asdict(self)
        data.update(weights_bytes=self.weights_bytes, state_bytes=self.state_bytes, peak_bytes=self.peak_bytes,
                    fits=self.fits)
        return data

    def render(self) -> str:
        verdict = "fits" if self.fits else "DOES NOT FIT"
        return "\n".join([
            f"plan for the model set ({', '.join(self.members)}): budget {format_bytes(self.budget_bytes)} "
            f"({self.budget_source})",
            f"  model-set stage: members' weights kept {format_bytes(self.weights_bytes)}, "
            f"metric state {format_bytes(self.state_bytes)}, working memory {format_bytes(self.transient_bytes)}",
            f"      metrics:   {', '.join(self.metrics)}",
            *(["      own passes: " + "; ".join(f"{who} " + ", ".join(f"{k} x{n}" for k, n in kinds.items())
                                               for who, kinds in self.own_passes.items())] if self.own_passes else []),
            *render_choices(self.rungs, self.left_out),
            f"  declared peak {format_bytes(self.peak_bytes)} (with the weights of the members run before each): "
            f"{verdict} in {format_bytes(self.budget_bytes)}"])


def set_passes(nodes: Sequence[MetricNode], view: ModelView, shape: RunShape, members: Sequence[str],
               base_name: str | None) -> dict[str, dict[str, int]]:
    """The own passes of the runnable model-set metrics over ``members`` models, sized on one member."""
    out: dict[str, dict[str, int]] = {}
    for n in nodes:
        if n.planned and n.cls.scope == "model_set":
            try:
                own = check_declared(n.set_cls.own_passes(n.params, view, shape, members, base_name), n.name)
            except Exception:
                own = {}  # the metric's own run reports the error
            if own:
                out[n.name] = own
    return out


def make_set_plan(nodes: Sequence[MetricNode], members: Sequence[ModelPlan], member_weights: Sequence[int],
                  declared: dict[str, int], budget_bytes: int,
                  own_passes: dict[str, dict[str, int]] | None = None,
                  transient: dict[str, int] | None = None,
                  results: dict[str, int] | None = None) -> ModelSetPlan | None:
    """The model-set stage's plan, or None when the run has no model-set metric."""
    names = [n.name for n in nodes if n.cls.scope == "model_set"]
    if not names:
        return None
    return ModelSetPlan(names, [p.model for p in members], list(member_weights), [p.peak_bytes for p in members],
                        budget_bytes, declared, transient or {}, results or {}, own_passes or {})
