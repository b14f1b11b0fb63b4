"""The appendix: the run's bookkeeping, each thing said once. Models and data, plugins, the
status of every metric, skip and failure reasons grouped by metric with the models they apply
to, the metrics' readings and the warnings grouped the same way, and what the pages left out."""

from __future__ import annotations

from typing import Any

from . import plots
from .blocks import Figure, Heading, Items, Para, Section, Table
from .context import Context

LONG_LIST = 30  # names listed before "and N more"
READINGS = 20


def _models(ctx: Context) -> list[Any]:
    record = ctx.results.record
    by_name = {m.name: m for m in record.models}
    rows = []
    for name, step in zip(ctx.order, ctx.ordering.steps, strict=True):
        m = by_name[name]
        rows.append([ctx.label[name], "" if step is None else step, m.family, m.dims.get("n_layers", ""),
                     m.dims.get("d_model", ""), m.dims.get("n_heads", ""), m.fingerprint[:8],
                     (m.data_fingerprint or "")[:8], m.n_sequences, m.n_tokens])
    cfg = record.config
    blocks: list[Any] = [Heading("Models and data"), Para(
        f"tensorscope {record.tensorscope_version} · seed {cfg.get('seed')} · device {record.device} · "
        f"dtype {record.dtype} · batch size {cfg.get('batch_size')} · max length {cfg.get('max_length') or 'auto'}"
        + (f" · {record.seconds_total:.4g} s" if record.seconds_total is not None else ""), "muted"),
        Table(["model", "step", "family", "layers", "d_model", "heads", "weights", "data", "sequences", "tokens"],
              rows, "weights and data: the first 8 characters of their fingerprints", wide=True)]
    renamed = [f"{ctx.label[n]}: {n}" for n in ctx.order if ctx.label[n] != n]
    if renamed:
        blocks.append(Items(renamed, "muted"))
    if len(record.models) > 1:
        same = len({m.data_fingerprint for m in record.models}) == 1
        blocks.append(Para("Every model saw the same data (same fingerprint)." if same else
                           "The models saw different data: differences are not paired.", "muted"))
    blocks += [Heading("Plugins"), Table(["plugin", "version", "status", "metrics", "error"], [
        [p.name, p.version or "", p.status, len(p.metrics), p.error or ""] for p in record.plugins])]
    return blocks


def _models_text(ctx: Context, models: list[str]) -> str:
    everyone = ctx.order if "(model set)" not in models else ctx.order + ["(model set)"]
    if len(models) == len(everyone) and len(everyone) > 1:
        return "every model"
    return ", ".join(ctx.label.get(m, m) for m in models)


def _status(ctx: Context) -> list[Any]:
    record = ctx.results.record
    status: dict[tuple[str, str], str] = {}
    grouped: dict[tuple[str, str, str], list[str]] = {}
    results = [(ctx.label[name], name, m) for name in ctx.order
               for m in [next(x for x in record.models if x.name == name)]]
    pairs = [(label, metric, r) for label, _, m in results for metric, r in m.metrics.items()]
    pairs += [("(model set)", metric, r) for metric, r in record.model_set.items()]
    for label, metric, result in pairs:
        status[(label, metric)] = result.status
        if result.status != "ok":
            why = f"{result.error_type}: {result.reason or ''}" if result.error_type else (result.reason or "")
            grouped.setdefault((metric, result.status, why), []).append(label)
    metrics = list(dict.fromkeys(metric for _, metric, _ in pairs))
    counts = {s: sum(1 for v in status.values() if v == s) for s in ("ok", "error", "skipped")}
    blocks: list[Any] = [Heading("What was computed"),
                         Para(f"{len(metrics)} metrics on {len(ctx.order)} model(s): {counts['ok']} ok, "
                              f"{counts['error']} error, {counts['skipped']} skipped.")]
    if metrics:
        columns = [ctx.label[n] for n in ctx.order] + (["(model set)"] if record.model_set else [])
        blocks.append(Figure(plots.status_grid(columns, metrics, status, "Status of every metric on every model")))
    blocks.append(Heading("Skipped and failed, by metric"))
    if grouped:
        blocks.append(Table(["metric", "status", "reason", "models"],
                            [[metric, st, why, _models_text(ctx, models)]
                             for (metric, st, why), models in grouped.items()]))
    else:
        blocks.append(Para("No metric failed or was skipped.", "muted"))
    return blocks


def _readings(ctx: Context) -> list[Any]:
    grouped: dict[str, list[str]] = {}
    for model, metric, reading in ctx.interpretations:
        text = f"{metric}: {reading.text}" + (f" ({reading.where})" if reading.where else "")
        grouped.setdefault(text, []).append(model)
    if not grouped:
        return []
    lines = [f"{text} — {_models_text(ctx, models)}" for text, models in grouped.items()]
    more = [Para(f"and {len(lines) - READINGS} more (each metric's interpret() on results.json)", "muted")] \
        if len(lines) > READINGS else []
    return [Heading("Readings of every metric"), Items(lines[:READINGS])] + more


def _warnings(ctx: Context) -> list[Any]:
    record = ctx.results.record
    grouped: dict[str, list[str]] = {}
    for p in record.plugins:
        if p.status != "ok":
            grouped.setdefault(f"plugin {p.name} is broken: {p.error}", [])
    for name in ctx.order:
        model = next(m for m in record.models if m.name == name)
        for note in model.notes:
            if not note.startswith("artifact '"):
                grouped.setdefault(note, []).append(name)
    extra = (ctx.results.comparisons.warnings if ctx.results.comparisons is not None else []) + [
        w for d in ctx.results.correlations.values() for w in d.warnings]
    for w in extra:
        grouped.setdefault(w, [])
    lines = [f"{note} ({_models_text(ctx, models)})" if models else note for note, models in grouped.items()]
    return [Heading("Warnings"), Items(lines, "warning") if lines else Para("None.", "muted")]


def _left_out(ctx: Context) -> list[Any]:
    lines = []
    for family, reasons in ctx.left_out.items():
        for reason, names in reasons.items():
            shown = ", ".join(names[:LONG_LIST]) + (f" and {len(names) - LONG_LIST} more" if len(names) > LONG_LIST
                                                    else "")
            lines.append(f"{family.removeprefix('tensorscope-')}, {reason}: {shown}")
    if not lines:
        return []
    return [Heading("Not drawn in the family sections"), Para("Every value is in results.json.", "muted"),
            Items(lines, "muted")]


def appendix(ctx: Context) -> Section:
    section = Section("appendix", "Appendix")
    section.blocks += _status(ctx)
    section.blocks += _warnings(ctx)
    section.blocks += _readings(ctx)
    section.blocks += _left_out(ctx)
    section.blocks += _models(ctx)
    return section
