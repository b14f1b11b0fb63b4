"""fisher.hotspots: the FIM analysis workflow that decides which heads to protect and which to compress."""

from __future__ import annotations

import math
import statistics
from typing import Any

from tensorscope_core.plugin_api import (
    Cost,
    HeadValue,
    Interpretation,
    Metric,
    MetricResult,
    ModelView,
    RunShape,
    ScalarValue,
    TableValue,
    TextValue,
)

from .hotspots_rules import (
    CATEGORIES,
    METRICS,
    HeadStats,
    HotspotParams,
    Verdict,
    classify,
    median_cond,
    top_heads,
)

TABLE_COLUMNS = ["run_name", "layer", "head", "metric", "value"]
HOTSPOT_KINDS = {"top_trace": "trace", "top_eigmax": "eigmax", "top_cond": "cond"}
GLOBAL_STATS = ("n_heads", "total_trace", "mean_trace", "median_trace", "max_trace", "mean_eigmax", "median_cond",
                "max_cond", "mean_effective_rank", "mean_energy_r8", "mean_energy_r16", "mlp_total_trace",
                "attn_trace_share", "n_critical", "n_high_potential", "n_moderate", "compression_potential",
                "efficiency_score")

GUIDE = """How to read the Fisher spectrum of a head (F = E[g gᵀ] over its parameters):
- trace (total Fisher mass): how much the loss reacts to the head's parameters on average. High: the head
  matters; protect it when pruning, merging or quantising (keep it in higher precision, exclude it from
  pruning, weight it up in Fisher merging). Low: a candidate for pruning or sharing.
- eigmax (sharpest direction): the curvature along the single most sensitive direction. High: small
  steps along it change the loss a lot; use smaller learning rates or stronger damping there.
- cond (eigmax / smallest nonzero eigenvalue): how uneven the sensitivity is. High: ill-conditioned,
  plain gradient descent is slow on it; second-order or adaptive optimisers, or a reparametrisation, help.
- energy_r8 / energy_r16 (share of the trace in the top 8 / 16 directions) and effective rank (directions
  holding 90% of it): high energy and a low effective rank mean the information sits in a few directions,
  so a low-rank approximation (LoRA-style, SVD truncation) of the head loses little.
Categories: critical = protect; high_potential = compress first; moderate = compress with care.
- compression_potential (0-100) rises with energy_r8 and with cond: a concentrated, uneven spectrum
  loses little under a low-rank approximation. efficiency_score (0-100) falls with the trace: 100 for a
  head the loss does not see, 0 for the head with the most Fisher mass."""


def head_stats(spectrum: MetricResult) -> list[HeadStats]:
    """Per head, the fields of ``fisher.spectrum`` the hotspot rules read (layer-major order)."""
    grids = {m: spectrum.value(f"attn_{m}") for m in METRICS}
    return [HeadStats(layer, head, *(grids[m][layer][head] for m in METRICS))
            for layer in range(len(grids["trace"])) for head in range(len(grids["trace"][layer]))]


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if finite else None


def global_stats(heads: list[HeadStats], verdicts: list[Verdict], mlp_traces: list[float | None]) -> dict[str, Any]:
    traces = [h.trace or 0.0 for h in heads]
    conds = [h.cond for h in heads if h.cond is not None and not math.isnan(h.cond)]
    mlp_total = sum(t or 0.0 for t in mlp_traces)
    total = sum(traces)
    counts = {c: sum(v.category == c for v in verdicts) for c in CATEGORIES}
    return {
        "n_heads": len(heads), "total_trace": total, "mean_trace": statistics.fmean(traces),
        "median_trace": statistics.median(traces), "max_trace": max(traces),
        "mean_eigmax": _mean([h.eigmax for h in heads]),
        "median_cond": median_cond(heads), "max_cond": max(conds) if conds else None,
        "mean_effective_rank": _mean([h.effective_rank for h in heads]),
        "mean_energy_r8": _mean([h.energy_r8 for h in heads]), "mean_energy_r16": _mean([h.energy_r16 for h in heads]),
        "mlp_total_trace": mlp_total, "attn_trace_share": total / (total + mlp_total) if total + mlp_total else None,
        **{f"n_{c}": counts[c] for c in ("critical", "high_potential", "moderate")},
        "compression_potential": statistics.fmean(v.compression_potential for v in verdicts),
        "efficiency_score": statistics.fmean(v.efficiency_score for v in verdicts),
    }


def _where(h: HeadStats) -> str:
    return f"layer {h.layer} head {h.head}"


def summary_text(run: str, heads: list[HeadStats], verdicts: list[Verdict], stats: dict[str, Any],
                 hot: dict[str, list[HeadStats]], params: HotspotParams) -> str:
    by_category = {c: [_where(h) for h, v in zip(heads, verdicts, strict=True) if v.category == c] for c in CATEGORIES}
    lines = [f"Fisher hotspots of {run}: {stats['n_heads']} heads, total head trace {stats['total_trace']:.4g} "
             f"({100 * (stats['attn_trace_share'] or 0):.0f}% of attention + MLP).",
             f"compression potential {stats['compression_potential']:.1f}/100, efficiency score "
             f"{stats['efficiency_score']:.1f}/100 (means over heads)."]
    for kind, metric in HOTSPOT_KINDS.items():
        if hot[kind]:
            h = hot[kind][0]
            lines.append(f"{kind.replace('_', ' ')}: {_where(h)} ({metric} {getattr(h, metric):.4g})")
    for c, label in (("critical", "critical (protect)"), ("high_potential", "high potential (compress first)"),
                     ("moderate", "moderate")):
        shown = ", ".join(by_category[c][:8]) + (" ..." if len(by_category[c]) > 8 else "")
        lines.append(f"{label}: {len(by_category[c])}{': ' + shown if shown else ''}")
    bound = stats["median_cond"]
    lines.append(f"thresholds: critical at trace > {params.critical_trace_fraction:g} x the top head's; high "
                 f"potential at cond ≥ {'n/a' if bound is None else f'{bound:.4g}'} (the median head's) and "
                 f"energy_r8 ≥ {params.potential_energy_r8:g}.")
    return "\n".join(lines)


class FisherHotspots(Metric):
    """The FIM hotspot workflow over ``fisher.spectrum``: which heads to protect, which to compress.

    - ``table``: the tall table ``run_name, layer, head, metric, value`` with trace, eigmax, cond,
      energy_r8, energy_r16 and effective_rank of every head (``head`` = its index) and MLP
      (``head`` = ``"mlp"``); null where a value is undefined.
    - ``category`` per head (codes 0 ``high_potential``, 1 ``moderate``, 2 ``critical``) and the
      ``categories`` table with each head's normalised trace, cond, energy_r8 and scores;
      ``compression_potential`` and ``efficiency_score`` per head (``*_head`` grids) and for the run
      (their means). The rules, thresholds (parameters) and score formulas are in
      ``tensorscope_fisher.hotspots_rules``: critical when trace / max trace > 0.95; high_potential
      when cond ≥ the median head's and energy_r8 ≥ 0.9; compression_potential =
      100·energy_r8·L/(1 + L) with L = log10 cond; efficiency_score = 100·(1 − trace/max trace).
    - ``hotspots``: the top_k heads by trace, eigmax and cond; the run's global statistics as
      scalars; ``summary``, the findings in words; ``guide``, how to read them.
    ``fisher.hotspots_compare`` compares these across the models of a run.
    """

    name = "fisher.hotspots"
    supports_dispatch = True  # reads fisher.grouped's results only
    version = "2"
    summary = "FIM hotspots: per-head categories (critical / high_potential / moderate), scores and a guide"
    Params = HotspotParams
    requires_metrics = ("fisher.spectrum",)
    derived_from = ("fisher.spectrum",)
    fields = {
        "table": "tall table run_name, layer, head, metric, value (heads, and MLPs with head 'mlp')",
        "category": "per head: 0 high_potential, 1 moderate, 2 critical",
        "categories": "table layer, head, category, trace_fraction, cond, energy_r8, compression_potential, "
                      "efficiency_score",
        "compression_potential_head": "per head, 100 · energy_r8 · L / (1 + L), L = log10 cond",
        "efficiency_score_head": "per head, 100 · (1 − trace / max trace)",
        "hotspots": "table kind (top_trace / top_eigmax / top_cond), rank, layer, head, value",
        **{s: f"run statistic over heads: {s}" for s in GLOBAL_STATS},
        "summary": "the findings in words (text)",
        "guide": "how to read the spectrum, the categories and the scores (text)",
    }

    @classmethod
    def cost(cls, params: HotspotParams, view: ModelView, shape: RunShape) -> Cost:
        return Cost(state_bytes=0, flops=float(100 * view.n_layers * view.n_heads))

    def finalize(self) -> dict[str, Any]:
        spectrum = self.deps["fisher.spectrum"]
        heads = head_stats(spectrum)
        verdicts = classify(heads, self.params)
        mlp = {m: spectrum.value(f"mlp_{m}") for m in METRICS}
        run = self.view.name
        rows = [[run, h.layer, h.head, m, getattr(h, m)] for h in heads for m in METRICS]
        rows += [[run, layer, "mlp", m, mlp[m][layer]] for layer in range(len(mlp["trace"])) for m in METRICS]
        stats = global_stats(heads, verdicts, mlp["trace"])
        hot = {kind: top_heads(heads, metric, self.params.top_k) for kind, metric in HOTSPOT_KINDS.items()}
        n_layers = len(spectrum.value("attn_trace"))

        def grid(values: list[float]) -> HeadValue:
            per_layer = len(values) // n_layers
            return HeadValue(values=[values[i * per_layer:(i + 1) * per_layer] for i in range(n_layers)])

        out: dict[str, Any] = {
            "table": TableValue(columns=TABLE_COLUMNS, rows=rows),
            "category": grid([float(CATEGORIES.index(v.category)) for v in verdicts]),
            "categories": TableValue(
                columns=["layer", "head", "category", "trace_fraction", "cond", "energy_r8", "compression_potential",
                         "efficiency_score"],
                rows=[[h.layer, h.head, v.category, v.trace_fraction, h.cond, h.energy_r8,
                       v.compression_potential, v.efficiency_score] for h, v in zip(heads, verdicts, strict=True)]),
            "compression_potential_head": grid([v.compression_potential for v in verdicts]),
            "efficiency_score_head": grid([v.efficiency_score for v in verdicts]),
            "hotspots": TableValue(columns=["kind", "rank", "layer", "head", "value"],
                                   rows=[[kind, r + 1, h.layer, h.head, getattr(h, HOTSPOT_KINDS[kind])]
                                         for kind, found in hot.items() for r, h in enumerate(found)]),
            "summary": TextValue(text=summary_text(run, heads, verdicts, stats, hot, self.params)),
            "guide": TextValue(text=GUIDE),
        }
        out.update({k: ScalarValue(value=v, n=len(heads)) for k, v in stats.items()})
        return out

    @classmethod
    def interpret(cls, result: MetricResult) -> list[Interpretation]:
        """Hotspots: the top head by trace, eigmax and cond; a warning when most heads are critical
        (thresholds too low for this model); the compression candidates as one reading."""
        readings = []
        hotspots = result.values["hotspots"]
        assert isinstance(hotspots, TableValue)
        for kind, rank, layer, head, value in hotspots.rows:
            if rank == 1:
                metric = HOTSPOT_KINDS[kind]
                readings.append(Interpretation(level="hotspot", text=f"largest Fisher {metric} ({value:.4g})",
                                               where=f"layer {layer} head {head}"))
        n_heads, critical = result.value("n_heads"), result.value("n_critical")
        if n_heads and critical > n_heads / 2:
            readings.append(Interpretation(level="warning", text=f"{critical:.0f} of {n_heads:.0f} heads are critical: "
                                           "the Fisher mass is spread unevenly or the thresholds are low"))
        categories = result.values["categories"]
        assert isinstance(categories, TableValue)
        targets = [f"layer {r[0]} head {r[1]}" for r in categories.rows if r[2] == "high_potential"]
        if targets:
            readings.append(Interpretation(level="info", text=f"{len(targets)} compression targets (high potential): "
                                           + ", ".join(targets[:6]) + (" ..." if len(targets) > 6 else "")))
        return readings
