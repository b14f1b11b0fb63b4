"""The FIM analysis workflow's files from a run's results: ``fim_summary.csv`` and ``fim.txt``.

It reads only what results.json holds (each model's ``fisher.hotspots`` result and, for several
models, ``fisher.hotspots_compare``) and reshapes it; it computes nothing, so the files can be
written anywhere the results can be loaded, without the fisher plugin or the models. Numbers are
written as Python's ``repr`` of the stored float, so they read back exactly.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from .errors import UsageError
from .results import Results
from .results.schema import MetricResult, ScalarValue, TableValue, TextValue
from .results.store import atomic_write, check_writable_folder

HOTSPOTS = "fisher.hotspots"
COMPARE = "fisher.hotspots_compare"
SUMMARY_CSV, SUMMARY_TXT = "fim_summary.csv", "fim.txt"
SUMMARY_COLUMNS = ("run_name", "layer", "head", "metric", "value", "category")
CATEGORY_ORDER = ("critical", "high_potential", "moderate")


def _fmt(v: Any) -> str:
    return "n/a" if v is None else repr(v) if isinstance(v, float) else str(v)


def _table(result: MetricResult, field: str) -> list[dict[str, Any]]:
    value = result.values[field]
    assert isinstance(value, TableValue)
    return [dict(zip(value.columns, row, strict=True)) for row in value.rows]


def hotspot_results(results: Results) -> dict[str, MetricResult]:
    """Each model's ok fisher.hotspots result, in the run's order; a usage error when none has one."""
    found = {m: results.model(m).metrics[HOTSPOTS] for m in results.models if HOTSPOTS in results.model(m).metrics}
    ok = {m: r for m, r in found.items() if r.ok}
    if not ok:
        states = ", ".join(f"{m}: {r.status} ({r.reason})" for m, r in found.items()) or "no model has it"
        raise UsageError(f"these results hold no ok {HOTSPOTS} result ({states})",
                         f"run `tensorscope analyze MODEL ... --metrics {HOTSPOTS},{COMPARE} --out DIR` "
                         "and pass DIR/results.json")
    return ok


def summary_rows(found: dict[str, MetricResult]) -> list[list[Any]]:
    """The tall ``run_name, layer, head, metric, value, category`` rows: each head's spectrum values
    (and each MLP's, category empty) from ``table``, then its scores from ``categories``."""
    rows: list[list[Any]] = []
    for result in found.values():
        table, heads = _table(result, "table"), _table(result, "categories")
        category = {(h["layer"], h["head"]): h["category"] for h in heads}
        rows += [[r["run_name"], r["layer"], r["head"], r["metric"], r["value"],
                  category.get((r["layer"], r["head"]), "")] for r in table]
        run = {(r["layer"], r["head"]): r["run_name"] for r in table}
        spectrum = {r["metric"] for r in table}
        scores = [c for c in heads[0] if c not in ("layer", "head", "category", *spectrum)] if heads else []
        rows += [[run[(h["layer"], h["head"])], h["layer"], h["head"], c, h[c], h["category"]]
                 for h in heads for c in scores]
    return rows


def _csv(rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(SUMMARY_COLUMNS)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buffer.getvalue()


def _global_section(found: dict[str, MetricResult]) -> list[str]:
    names = list(found)
    stats = [f for f, v in found[names[0]].values.items() if isinstance(v, ScalarValue)]
    cells = [["statistic", *names]] + [[s, *(_fmt(found[m].value(s)) if s in found[m].values else "n/a"
                                              for m in names)] for s in stats]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return ["== Global statistics (over the attention heads of each run) =="] + [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]


def _comparison_section(results: Results, found: dict[str, MetricResult]) -> list[str]:
    lines = ["== Cross-run comparison =="]
    if len(found) < 2:
        return lines + ["one run: nothing to compare (analyse several models or checkpoints in one run)."]
    compare = results.record.model_set.get(COMPARE)
    if compare is None or not compare.ok:
        why = "not in this run" if compare is None else f"{compare.status}: {compare.reason}"
        return lines + [f"{COMPARE} {why}; the global statistics above compare the runs."]
    summary = compare.values["summary"]
    assert isinstance(summary, TextValue)
    lines.append(summary.text)
    if "category_changes" in compare.values:
        changed = [r for r in _table(compare, "category_changes") if r["changed"]]
        lines += [f"changed: layer {r['layer']} head {r['head']}: "
                  + " -> ".join(str(r[m]) for m in found if m in r) for r in changed]
    return lines


def _hotspot_section(found: dict[str, MetricResult]) -> list[str]:
    lines = ["== Hotspots =="]
    for model, result in found.items():
        lines.append(f"[{model}]")
        lines += [f"{r['kind']} #{r['rank']}: layer {r['layer']} head {r['head']} ({_fmt(r['value'])})"
                  for r in _table(result, "hotspots")]
        heads = _table(result, "categories")
        for category in CATEGORY_ORDER:
            chosen = [h for h in heads if h["category"] == category]
            lines.append(f"{category}: {len(chosen)} head(s)")
            lines += [f"  {category} {model} layer {h['layer']} head {h['head']}: "
                      + ", ".join(f"{c} {_fmt(v)}" for c, v in h.items() if c not in ("layer", "head", "category"))
                      for h in chosen]
        summary = result.values["summary"]
        assert isinstance(summary, TextValue)
        lines += [summary.text, ""]
    return lines


def fim_text(results: Results, found: dict[str, MetricResult], source: str) -> str:
    """fim.txt: global statistics, cross-run comparison, hotspots and categories, interpretation guide."""
    first = next(iter(found.values()))
    guide = first.values.get("guide")  # fisher.hotspots 1 kept its guide inside the summary
    versions = sorted({r.version for r in found.values()})
    missing = []
    for model in results.models:
        if model not in found:
            result = results.model(model).metrics.get(HOTSPOTS)
            missing.append(f"{model} ({result.status}: {result.reason})" if result else f"{model} (not run)")
    header = [f"FIM analysis of {source}", f"runs: {', '.join(found)} ({HOTSPOTS} version {', '.join(versions)})"]
    parts = [header + ([f"left out, no ok {HOTSPOTS}: " + "; ".join(missing)] if missing else []),
             _global_section(found), _comparison_section(results, found), _hotspot_section(found)]
    if isinstance(guide, TextValue):
        parts.append(["== Interpretation guide ==", guide.text])
    return "\n\n".join("\n".join(p) for p in parts).rstrip() + "\n"


def write_fim_files(results: Results, out: Path, source: str = "results.json") -> dict[str, Path]:
    """Write ``fim_summary.csv`` and ``fim.txt`` into ``out``; returns their paths by name."""
    found = hotspot_results(results)
    check_writable_folder(out, "output folder", "--out")
    paths = {"csv": out / SUMMARY_CSV, "txt": out / SUMMARY_TXT}
    for key, text in (("csv", _csv(summary_rows(found))), ("txt", fim_text(results, found, source))):
        with atomic_write(paths[key]) as handle:
            handle.write(text)
    return paths
