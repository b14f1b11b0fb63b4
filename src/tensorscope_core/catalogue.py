"""The metric catalogue, generated from the registered specs (CLI and docs/ share it)."""

from __future__ import annotations

from typing import Any

from .plugins import Registry


def catalogue(registry: Registry) -> list[dict[str, Any]]:
    entries = []
    for name in sorted(registry.metrics):
        entry = registry.metrics[name].describe()
        entry["plugin"] = registry.metric_plugin[name]
        entries.append(entry)
    return entries


def explain_text(entry: dict[str, Any]) -> str:
    lines = [f"{entry['name']}  (version {entry['version']}, plugin {entry['plugin']}, scope {entry['scope']})",
             "", entry["doc"] or entry["summary"], ""]
    lines.append("needs artifacts: " + (", ".join(entry["artifacts"]) or "-"))
    lines.append("needs metrics:   " + (", ".join(entry["requires_metrics"]) or "-"))
    lines.append("parameters:" + ("" if entry["params"] else " none"))
    for pname, p in entry["params"].items():
        lines.append(f"  {pname} (default {p['default']!r}): {p['description']}")
    lines.append("fields:")
    for fname, meaning in entry["fields"].items():
        lines.append(f"  {fname}: {meaning}")
    return "\n".join(lines)


def catalogue_markdown(registry: Registry) -> str:
    """docs/metrics.md: one section per metric, written from the same entries as `explain`."""
    out = ["# Metric catalogue", "",
           "Generated from the registered metric specs by `python -m tensorscope_core.catalogue`;",
           "do not edit by hand (a test checks it matches the code).", ""]
    for entry in catalogue(registry):
        out += [f"## `{entry['name']}`", "", f"*plugin {entry['plugin']}, version {entry['version']}, "
                f"scope {entry['scope']}*", "", entry["doc"] or entry["summary"], "",
                f"- artifacts: {', '.join(f'`{a}`' for a in entry['artifacts']) or '-'}",
                f"- requires metrics: {', '.join(f'`{m}`' for m in entry['requires_metrics']) or '-'}"]
        if entry["params"]:
            out.append("- parameters:")
            out += [f"  - `{k}` (default `{p['default']!r}`): {p['description']}" for k, p in entry["params"].items()]
        out.append("- fields:")
        out += [f"  - `{k}`: {v}" for k, v in entry["fields"].items()]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    from .plugins import get_registry

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/metrics.md")
    target.write_text(catalogue_markdown(get_registry()))
    print(f"wrote {target}")
