"""The first page: models, data, seed, what was computed, what failed and why, the
strongest findings and every warning (insufficient n, broken plugins, data notes)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..results.analysis import Finding, Interpretation
from . import plots
from .blocks import Figure, Heading, Items, Para, Section, Table, ci, num

if TYPE_CHECKING:
    from ..results import Results

TOP_FINDINGS = 8


def strongest(results: Results, n: int = TOP_FINDINGS) -> list[Finding]:
    found = [f for d in results.correlations.values() for f in d.significant]
    return sorted(found, key=lambda f: -abs(f.r or 0.0))[:n]


def warnings_of(results: Results, order: list[str]) -> list[str]:
    record = results.record
    out = [f"plugin {p.name} is broken: {p.error}" for p in record.plugins if p.status != "ok"]
    for name in order:
        model = next(m for m in record.models if m.name == name)
        out += [f"{name}: {note}" for note in model.notes if not note.startswith("artifact '")]
    if results.comparisons is not None:
        out += results.comparisons.warnings
    for d in results.correlations.values():
        out += d.warnings
    return out


def overview(results: Results, order: list[str], steps: list[int | None],
             interpretations: list[tuple[str, str, Interpretation]], label: Mapping[str, str]) -> Section:
    record = results.record
    cfg = record.config
    section = Section("overview", "Overview")
    section.blocks.append(Para(
        f"tensorscope {record.tensorscope_version} · seed {cfg.get('seed')} · device {record.device} · "
        f"dtype {record.dtype} · batch size {cfg.get('batch_size')} · max length {cfg.get('max_length') or 'auto'}"
        + (f" · {num(record.seconds_total)} s" if record.seconds_total is not None else "")))
    by_name = {m.name: m for m in record.models}
    rows = []
    for name, step in zip(order, steps, strict=True):
        m = by_name[name]
        rows.append([label[name], "" if step is None else step, m.family, m.dims.get("n_layers", ""),
                     m.dims.get("d_model", ""), m.dims.get("n_heads", ""), m.fingerprint[:8],
                     (m.data_fingerprint or "")[:8], m.n_sequences, m.n_tokens])
    section.blocks += [Heading("Models and data"), Table(
        ["model", "step", "family", "layers", "d_model", "heads", "weights", "data", "sequences", "tokens"], rows,
        "weights and data: the first 8 characters of their fingerprints")]
    renamed = [f"{label[n]}: {n}" for n in order if label[n] != n]
    if renamed:
        section.blocks.append(Items(renamed, "muted"))
    data = {m.data_fingerprint for m in record.models}
    if len(record.models) > 1:
        section.blocks.append(Para("Every model saw the same data (same fingerprint)." if len(data) == 1 else
                                   "The models saw different data: differences are not paired.", "muted"))
    section.blocks += [Heading("Plugins"), Table(
        ["plugin", "version", "status", "metrics", "error"],
        [[p.name, p.version or "", p.status, len(p.metrics), p.error or ""] for p in record.plugins])]

    status: dict[tuple[str, str], str] = {}
    failures = []
    metric_names: list[str] = []
    for name in order:
        for metric, result in by_name[name].metrics.items():
            status[(name, metric)] = result.status
            metric_names.append(metric)
            if result.status != "ok":
                failures.append([label[name], metric, result.status, result.error_type or "", result.reason or ""])
    for metric, result in record.model_set.items():
        status[("(model set)", metric)] = result.status
        metric_names.append(metric)
        if result.status != "ok":
            failures.append(["(model set)", metric, result.status, result.error_type or "", result.reason or ""])
    metric_names = list(dict.fromkeys(metric_names))
    counts = {s: sum(1 for v in status.values() if v == s) for s in ("ok", "error", "skipped")}
    section.blocks += [Heading("What was computed"),
                       Para(f"{len(metric_names)} metrics on {len(order)} model(s): {counts['ok']} ok, "
                            f"{counts['error']} error, {counts['skipped']} skipped.")]
    if metric_names:
        rows_for = order + (["(model set)"] if record.model_set else [])
        shown = {(label.get(m, m), k): v for (m, k), v in status.items()}
        section.blocks.append(Figure(plots.status_grid([label.get(m, m) for m in rows_for], metric_names, shown,
                                                       "Status of every metric on every model")))
    section.blocks.append(Heading("Failures"))
    if failures:
        section.blocks.append(Table(["model", "metric", "status", "error", "reason"], failures))
    else:
        section.blocks.append(Para("No metric failed or was skipped.", "muted"))

    section.blocks.append(Heading("Strongest findings"))
    top = strongest(results)
    if top:
        section.blocks.append(Table(["x", "y", "unit", "r", "95% CI", "n", "p (BH)"],
                                    [[f.x, f.y, f.unit, num(f.r, 3), ci(f.ci_low, f.ci_high), f.n,
                                      num(f.p_adjusted, 3)] for f in top]))
    else:
        tested = sum(len(d.findings) for d in results.correlations.values())
        section.blocks.append(Para(f"No correlation survived the FDR correction ({tested} pairs tested)."
                                   if tested else "No correlation could be tested (see warnings).", "muted"))
    flagged = [(model, metric, i) for model, metric, i in interpretations if i.level != "info"]
    if flagged:
        section.blocks += [Heading("Interpretations"),
                           Items([f"{label[model]} · {metric}: {i.text}" + (f" ({i.where})" if i.where else "")
                                  for model, metric, i in flagged], "warning")]
    notes = warnings_of(results, order)
    section.blocks.append(Heading("Warnings"))
    section.blocks.append(Items(notes, "warning") if notes else Para("None.", "muted"))
    return section
