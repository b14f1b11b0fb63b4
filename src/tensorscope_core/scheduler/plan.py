"""The memory and pass plan of one model, made and checked before anything runs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from ..artifacts import ArtifactSpec, act_bytes
from ..config import format_bytes
from ..metric import RunShape
from ..models.view import ModelView
from ..plugins import Registry
from .graph import MetricNode


@dataclass
class PassPlan:
    """One pass over the data (or over the weights) serving a stage's metrics together."""

    stage: int
    kind: str  # "weights" | "forward" | "forward+backward"
    metrics: list[str]
    artifacts: list[str]
    artifact_bytes: int = 0
    activation_bytes: int = 0
    state_bytes: int = 0
    peak_bytes: int = 0


@dataclass
class ModelPlan:
    model: str
    passes: list[PassPlan]
    weights_bytes: int
    micro_batch: int
    batch_size: int
    budget_bytes: int
    declared_state: dict[str, int] = field(default_factory=dict)

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
                 f"weights {format_bytes(self.weights_bytes)}, budget {format_bytes(self.budget_bytes)}"]
        for p in self.passes:
            lines.append(f"  stage {p.stage} {p.kind:<17} peak {format_bytes(p.peak_bytes):>10}  "
                         f"(artifacts {format_bytes(p.artifact_bytes)}, "
                         f"activations {format_bytes(p.activation_bytes)}, "
                         f"metric state {format_bytes(p.state_bytes)})")
            lines.append(f"      artifacts: {', '.join(p.artifacts) or '-'}")
            lines.append(f"      metrics:   {', '.join(p.metrics)}")
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"  declared peak {format_bytes(self.peak_bytes)}: {verdict} in {format_bytes(self.budget_bytes)}")
        return "\n".join(lines)


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


def pass_kind(specs: Sequence[ArtifactSpec]) -> str:
    kinds = {s.pass_kind for s in specs}
    if "backward" in kinds:
        return "forward+backward"
    if "forward" in kinds:
        return "forward"
    return "weights"


def _pass_peak(view: ModelView, p: PassPlan, micro: int, seq: int, specs: Sequence[ArtifactSpec],
               batch_size: int) -> None:
    p.artifact_bytes = sum(s.nbytes(view, batch_size, seq) for s in specs)
    if p.kind == "forward+backward":
        p.activation_bytes = act_bytes(view, micro, seq)  # gradients are the param_grad artifact
    elif p.kind == "forward":
        p.activation_bytes = act_bytes(view, micro, seq) // max(view.n_layers, 1)
    else:
        p.activation_bytes = 0
    p.peak_bytes = view.param_bytes + p.artifact_bytes + p.activation_bytes + p.state_bytes


def make_plan(nodes: Sequence[MetricNode], view: ModelView, shape: RunShape, registry: Registry,
              budget_bytes: int, min_micro_batch: int = 1) -> ModelPlan:
    """Group runnable metrics into passes by stage and find the largest micro-batch that fits."""
    runnable = [n for n in nodes if n.unavailable is None and n.cls.scope == "model"]
    declared = {n.name: n.cls.cost(n.params, view, shape).state_bytes for n in runnable}
    passes: list[tuple[PassPlan, list[ArtifactSpec]]] = []
    for stage in sorted({n.stage for n in runnable}):
        members = [n for n in runnable if n.stage == stage]
        weights_only = [n.name for n in members if not (set(n.cls.artifacts) - {"weights"})]
        data_metrics = [n for n in members if n.name not in weights_only]
        if weights_only:
            passes.append((PassPlan(stage, "weights", weights_only, ["weights"],
                                    state_bytes=sum(declared[m] for m in weights_only)), []))
        if data_metrics:
            wanted = sorted({a for n in data_metrics for a in n.cls.artifacts} - {"weights"})
            specs = closure(wanted, registry)
            passes.append((PassPlan(stage, pass_kind(specs), [n.name for n in data_metrics],
                                    [s.name for s in specs],
                                    state_bytes=sum(declared[n.name] for n in data_metrics)), specs))
    micro = shape.batch_size
    while True:
        for p, specs in passes:
            _pass_peak(view, p, micro, shape.seq_len, specs, shape.batch_size)
        plan = ModelPlan(view.name, [p for p, _ in passes], view.param_bytes, micro, shape.batch_size,
                         budget_bytes, declared)
        if plan.fits or micro <= min_micro_batch:
            return plan
        micro = max(min_micro_batch, micro // 2)
