"""The report section of fisher.triangulation: per model the estimates and the pairwise verdicts as tables."""

from __future__ import annotations

from typing import Any

TITLE = "Curvature triangulation"


def _table(columns: list[str], rows: list[list[Any]]) -> str:
    from markupsafe import escape

    def cell(x: Any) -> str:
        return "—" if x is None else f"{x:.4g}" if isinstance(x, float) else str(escape(x))

    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(x)}</td>" for x in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def triangulation_section(results: Any) -> str | None:
    """Every model with an ok fisher.triangulation result; nothing when none has one."""
    from markupsafe import escape

    shown = [
        m
        for m in results.models
        if "fisher.triangulation" in results.model(m).metrics and results.get("fisher.triangulation", model=m).ok
    ]
    parts = []
    for model in shown:
        values = results.get("fisher.triangulation", model=model).values
        parts.append(
            f"<h3>{escape(model)}</h3>"
            + _table(values["estimates"].columns, values["estimates"].rows)
            + _table(values["pairs"].columns, values["pairs"].rows)
            + (_table(values["missing"].columns, values["missing"].rows) if values["missing"].rows else "")
        )
    return "".join(parts) or None
