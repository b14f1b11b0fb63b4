"""The pieces a report section is made of; the template renders each kind (escaping all text)."""

from __future__ import annotations

import math
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .plots import Plot


@dataclass
class Heading:
    text: str
    kind: str = "heading"


@dataclass
class Para:
    text: str
    level: str = ""  # "", "warning", "error", "muted"
    kind: str = "para"


@dataclass
class Items:
    items: list[str]
    level: str = ""
    kind: str = "items"


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""
    #: many columns: set in a smaller font so it fits the page
    wide: bool = False
    kind: str = "table"


@dataclass
class Figure:
    plot: Plot
    kind: str = "figure"


@dataclass
class Html:
    """Trusted HTML from a plugin's report section (the plugin escapes what it inserts)."""

    html: str
    kind: str = "html"


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Any] = field(default_factory=list)
    #: follows the previous section on the same page (family and contributed sections) instead of a new page
    flow: bool = False

    @property
    def plots(self) -> int:
        return sum(1 for b in self.blocks if isinstance(b, Figure)) + sum(
            b.html.count('class="plot"') for b in self.blocks if isinstance(b, Html))


def num(value: Any, digits: int = 4) -> str:
    """A number as the report prints it (blank for missing, 4 significant digits)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return ""
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value)


def ci(low: Any, high: Any) -> str:
    return f"[{num(low)}, {num(high)}]" if low is not None and high is not None else ""


def short_names(names: Sequence[str]) -> dict[str, str]:
    """Display names for plots and tables: model paths without their common folder
    (``runs/a/ckpt_step_100`` -> ``ckpt_step_100``); other names unchanged."""
    stripped = [n.rstrip("/") for n in names]
    if len(names) < 2 or not all("/" in n for n in stripped):
        return {n: n for n in names}
    common = posixpath.commonpath(stripped) if all(n.startswith("/") for n in stripped) or not any(
        n.startswith("/") for n in stripped) else ""
    short = [n[len(common):].lstrip("/") if common else n for n in stripped]
    if any(not s for s in short) or len(set(short)) != len(short):
        return {n: n for n in names}
    return dict(zip(names, short, strict=True))
