"""matplotlib figures for reports, embedded as data URIs (``<img src="data:...">``).

Figures are built on ``matplotlib.figure.Figure`` (no pyplot state, no GUI backend). Line
plots are SVG (text stays text: small, searchable PDFs); figures with images (heatmaps,
grids, matrices) or many points are PNG at ``DPI``, so the PDF stays small and fast to lay
out. ``$`` in names is escaped so no name is read as mathtext, and matplotlib XML-escapes
``<``. A data URI keeps each SVG's ids to itself. Figures are serialised when first shown,
so a section that drops some (``figure_budget``) does not pay for them. Plugins use
``figure_html`` and the plot functions for their own report sections.
"""

from __future__ import annotations

import base64
import io
import itertools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import MissingDependencyError

WIDTH = 7.0  # inches: the text width of an A4 page with 15 mm margins
STATUS_COLOURS = {"ok": "#4caf50", "error": "#e53935", "skipped": "#bdbdbd", "absent": "#ffffff"}
DPI = 150  # PNG figures: sharp in print at the page width, a few tens of kB each
DENSE_POINTS = 2000  # a figure drawing more points than this is a PNG
#: colour-scale bounds fixed for fields whose values all lie inside them (scores, fractions,
#: correlations), so the same colour means the same value on every checkpoint and in every report
FIXED_SCALES = ((0.0, 1.0), (-1.0, 1.0))
TICKS_MAX = 20  # matrices with more rows than this are drawn without per-row tick labels
_plot_ids = itertools.count(1)


class Plot:
    """One figure and its caption; ``uri`` (an SVG or PNG data URI) is made on first use."""

    def __init__(self, fig: Any, caption: str, id: str) -> None:
        self._fig: Any = fig
        self._uri: str | None = None
        self.caption = caption
        self.id = id
        #: inches on the page: a PNG's pixels are not CSS pixels, so the HTML states the size
        self.width = round(float(fig.get_figwidth()), 2)

    @property
    def uri(self) -> str:
        if self._uri is None:
            self._uri = _serialise(self._fig)
            self._fig = None
        return self._uri


@dataclass
class Budget:
    """At most ``limit`` figures of one section are shown: ``figure_html`` leaves a marker for
    each, ``resolve`` keeps the last ``limit`` (a per-model section ends on the latest model)."""

    limit: int
    plots: list[Plot] = field(default_factory=list)

    def marker(self, plot: Plot) -> str:
        self.plots.append(plot)
        return f"<!--ts-plot-{len(self.plots) - 1}-->"

    @property
    def dropped(self) -> int:
        return max(0, len(self.plots) - self.limit)

    def resolve(self, html: str) -> str:
        """``html`` with the kept figures in place; a part under an ``<h3>`` whose figures were all
        dropped (another model's copy of the same plots) is dropped with its heading."""
        import re

        marker = re.compile(r"<!--ts-plot-(\d+)-->")
        parts = re.split(r"(?=<h3[ >])", html)
        kept = [p for p in parts if not p.startswith("<h3") or not (found := [int(i) for i in marker.findall(p)])
                or any(i >= self.dropped for i in found)]
        return marker.sub(lambda m: _figure(self.plots[int(m.group(1))]) if int(m.group(1)) >= self.dropped
                          else "", "".join(kept))


_budget: ContextVar[Budget | None] = ContextVar("tensorscope_report_budget", default=None)


@contextmanager
def figure_budget(limit: int) -> Iterator[Budget]:
    """Inside: ``figure_html`` defers figures to the returned budget (see ``Budget.resolve``)."""
    budget = Budget(limit)
    token = _budget.set(budget)
    try:
        yield budget
    finally:
        _budget.reset(token)


def _mpl() -> Any:
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingDependencyError("matplotlib", "report plots") from exc
    return matplotlib, Figure


@contextmanager
def _style() -> Iterator[None]:
    matplotlib, _ = _mpl()
    rc = {"svg.fonttype": "none", "svg.hashsalt": "tensorscope", "font.size": 8,
          "axes.titlesize": 9, "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 100,
          "axes.spines.top": False, "axes.spines.right": False}
    with matplotlib.rc_context(rc):
        yield


def new_figure(height: float = 3.0, width: float = WIDTH) -> Any:
    """A fresh Figure in the report style (call inside ``render``)."""
    _, Figure = _mpl()
    return Figure(figsize=(width, height), layout="constrained")


def render(fig: Any, caption: str) -> Plot:
    """The figure as a report plot (serialised when first shown)."""
    return Plot(fig, caption, f"plot-{next(_plot_ids)}")


def dense(fig: Any) -> bool:
    """Whether ``fig`` is drawn as PNG: it holds an image or more than ``DENSE_POINTS`` points."""
    points = 0
    for ax in fig.axes:
        if ax.images:
            return True
        points += sum(len(line.get_xdata()) for line in ax.lines)
        points += sum(len(c.get_offsets()) for c in ax.collections if hasattr(c, "get_offsets"))
    return points > DENSE_POINTS


def fit_titles(fig: Any, smallest: float = 5.0) -> None:
    """Shrink each axes title that is wider than its axes (plugins' long names), so titles never overlap."""
    width = fig.get_figwidth() * 72.0
    for ax in fig.axes:
        title = ax.title
        text = title.get_text()
        if text:
            room = ax.get_position().width * width
            fits = room / (0.6 * len(text))
            title.set_fontsize(max(smallest, min(title.get_fontsize(), fits)))


def _serialise(fig: Any) -> str:
    fit_titles(fig)
    buffer = io.BytesIO()
    if dense(fig):
        fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    with _style():
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    return "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(plot: Plot) -> str:
    from markupsafe import escape

    return (f'<figure class="plot" id="{plot.id}"><img alt="{escape(plot.caption)}" src="{plot.uri}" '
            f'style="width: {plot.width}in"><figcaption>{escape(plot.caption)}</figcaption></figure>')


def figure_html(plot: Plot) -> str:
    """HTML of a plot for a plugin's report section (caption escaped); inside ``figure_budget``
    a marker the budget resolves."""
    budget = _budget.get()
    return budget.marker(plot) if budget is not None else _figure(plot)


def _short(text: str, n: int = 28) -> str:
    """A label as drawn: at most ``n`` characters, ``$`` escaped (no mathtext from names)."""
    text = str(text)
    text = text if len(text) <= n else text[: n - 1] + "\u2026"
    return text.replace("$", r"\$")


def _colours(n: int) -> list[Any]:
    matplotlib, _ = _mpl()
    cmap = matplotlib.colormaps["viridis"]
    return [cmap(0.9 * i / max(1, n - 1)) for i in range(n)]


def _array(values: Sequence[Any]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def status_grid(models: Sequence[str], metrics: Sequence[str], status: Mapping[tuple[str, str], str],
                caption: str) -> Plot:
    """Metrics down, models across, coloured by ok / error / skipped (metric names read horizontally)."""
    with _style():
        matplotlib, _ = _mpl()
        order = list(STATUS_COLOURS)
        grid = np.array([[order.index(status.get((m, k), "absent")) for m in models] for k in metrics])
        fig = new_figure(height=min(9.5, 1.8 + 0.14 * len(metrics)), width=min(WIDTH, 3.2 + 0.4 * len(models)))
        ax = fig.add_subplot()
        cmap = matplotlib.colors.ListedColormap([STATUS_COLOURS[s] for s in order])
        ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(order) - 0.5, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(metrics)), [_short(k, 40) for k in metrics], fontsize=6.5)
        ax.set_xticks(range(len(models)), [_short(m, 14) for m in models], rotation=40, ha="right", fontsize=7)
        ax.xaxis.tick_top()
        ax.tick_params(axis="x", labelbottom=False, labeltop=True)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("left")
        ax.grid(False)
        ax.set_xticks(np.arange(-0.5, len(models)), minor=True)
        ax.set_yticks(np.arange(-0.5, len(metrics)), minor=True)
        ax.grid(which="minor", color="white", linewidth=1)
        ax.tick_params(which="minor", length=0)
        handles = [matplotlib.patches.Patch(color=STATUS_COLOURS[s], label=s) for s in order[:3]]
        fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False)
        return render(fig, caption)


def layer_lines(labels: Sequence[str], series: Mapping[str, Sequence[float | None]], caption: str,
                ylabel: str = "") -> Plot:
    """One line per model over layers (models in comparison order, coloured early to late)."""
    with _style():
        fig = new_figure(height=2.8)
        ax = fig.add_subplot()
        for colour, (name, values) in zip(_colours(len(series)), series.items(), strict=True):
            ax.plot(range(len(values)), _array(values), marker="o", ms=3, color=colour, label=_short(name))
        ax.set_xticks(range(len(labels)), [_short(str(x), 10) for x in labels])
        ax.set_xlabel("layer")
        ax.set_ylabel(_short(ylabel, 40))
        if len(series) > 1:
            ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return render(fig, caption)


def colour_scale(arrays: Sequence[np.ndarray]) -> tuple[float, float]:
    """One (vmin, vmax) for all ``arrays``: the first of ``FIXED_SCALES`` that holds every finite
    value (so a score of 0.09 stays dark), else their joint range."""
    finite = np.concatenate([a[np.isfinite(a)].ravel() for a in arrays]) if arrays else np.array([])
    if not finite.size:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    for vmin, vmax in FIXED_SCALES:
        if vmin <= low and high <= vmax:
            return vmin, vmax
    return (low, high) if high > low else (low - 0.5, high + 0.5)


def heatmaps(grids: Mapping[str, Sequence[Sequence[float | None]]], caption: str, xlabel: str = "head",
             ylabel: str = "layer", max_panels: int = 6, label: str = "") -> Plot:
    """Small multiples of layer x head grids on one colour scale (``colour_scale``) with a colour
    bar (at most ``max_panels``, evenly chosen, the first and last included)."""
    names = list(grids)
    if len(names) > max_panels:
        names = [names[round(i)] for i in np.linspace(0, len(names) - 1, max_panels)]
    arrays = [np.array([_array(row) for row in grids[n]]) for n in names]
    vmin, vmax = colour_scale(arrays)
    with _style():
        matplotlib, _ = _mpl()
        cols = min(3, len(names))
        rows = -(-len(names) // cols)
        fig = new_figure(height=1.9 * rows + 0.3)
        axes = fig.subplots(rows, cols, squeeze=False)
        image = None
        for ax, name, grid in zip(axes.flat, names, arrays, strict=False):
            cmap = "RdBu_r" if vmin < 0 < vmax else "magma"
            image = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
            ax.set_title(_short(name, 30))
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            for axis, size in ((ax.xaxis, grid.shape[1]), (ax.yaxis, grid.shape[0])):
                axis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=min(size, 8), integer=True))
            ax.grid(False)
        for ax in list(axes.flat)[len(names):]:
            ax.set_visible(False)
        if image is not None:
            fig.colorbar(image, ax=axes, shrink=0.8, label=_short(label, 30))
        return render(fig, caption)


def series_lines(series: Mapping[str, Sequence[float | None]], caption: str, index_name: str = "index") -> Plot:
    """Spectra and other ordered series, log scale when positive and spanning >100x."""
    with _style():
        fig = new_figure(height=2.8)
        ax = fig.add_subplot()
        everything = np.concatenate([_array(v) for v in series.values()]) if series else np.array([])
        finite = everything[np.isfinite(everything)]
        for colour, (name, values) in zip(_colours(len(series)), series.items(), strict=True):
            ax.plot(_array(values), color=colour, lw=1.2, label=_short(name))
        if finite.size and finite.min() > 0 and finite.max() / finite.min() > 100:
            ax.set_yscale("log")
        ax.set_xlabel(index_name)
        if len(series) > 1:
            ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return render(fig, caption)


def scalar_panels(models: Sequence[str], panels: Mapping[str, tuple[Sequence[Any], Sequence[Any], Sequence[Any]]],
                  caption: str, trajectory: bool = False, xlabels: Sequence[str] | None = None,
                  spans: Mapping[str, Sequence[tuple[int, int]]] | None = None) -> Plot:
    """One small panel per scalar: the value per model with its CI (a line with a band across checkpoints);
    ``spans``: per panel, (before, after) model positions of a change found there, shaded."""
    names = list(panels)
    with _style():
        cols = min(3, len(names))
        rows = -(-len(names) // cols)
        fig = new_figure(height=2.1 * rows + 0.3)
        axes = fig.subplots(rows, cols, squeeze=False)
        x = np.arange(len(models))
        ticks = [_short(t, 14) for t in (xlabels or models)]
        tilt = len(models) > 3 or sum(len(t) for t in ticks) > 24
        for ax, name in zip(axes.flat, names, strict=False):
            values, low, high = (_array(v) for v in panels[name])
            if trajectory:
                ax.plot(x, values, marker="o", ms=3, color="#1f77b4")
                if np.isfinite(low).any():
                    ax.fill_between(x, low, high, color="#1f77b4", alpha=0.2, lw=0)
            else:
                err = np.vstack([values - low, high - values])
                ax.errorbar(x, values, yerr=np.where(np.isfinite(err), err, 0), fmt="o", ms=4, capsize=3)
            for before, after in (spans or {}).get(name, ()):
                ax.axvspan(before, after, color="#d62728", alpha=0.15, lw=0)
            ax.set_title(_short(name, 40))
            ax.set_xticks(x, ticks, rotation=30 if tilt else 0, ha="right" if tilt else "center")
        for ax in list(axes.flat)[len(names):]:
            ax.set_visible(False)
        return render(fig, caption)


def trajectory_heatmap(labels: Sequence[str], models: Sequence[str], values: Sequence[Sequence[float | None]],
                       caption: str) -> Plot:
    """A per-layer field over checkpoints: layers down, checkpoints across."""
    grid = np.array([_array(row) for row in values]).T
    with _style():
        fig = new_figure(height=min(6.0, 1.2 + 0.25 * len(labels)))
        ax = fig.add_subplot()
        image = ax.imshow(grid, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(models)), [_short(m, 14) for m in models], rotation=30, ha="right")
        ax.set_yticks(range(len(labels)), [_short(str(x), 10) for x in labels])
        ax.set_ylabel("layer")
        ax.grid(False)
        fig.colorbar(image, ax=ax, shrink=0.9)
        return render(fig, caption)


def correlation_matrix(variables: Sequence[str], r: np.ndarray, significant: np.ndarray, excluded: np.ndarray,
                       caption: str) -> Plot:
    """r of the tested pairs (NaN: not tested, drawn blank); '*' marks FDR-significant
    cells, '×' pairs never tested (same metric or a declared derivation)."""
    with _style():
        matplotlib, _ = _mpl()
        size = min(7.0, 2.5 + 0.35 * len(variables))
        fig = new_figure(height=size, width=min(WIDTH, size + 1.5))
        ax = fig.add_subplot()
        cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#f2f2f2")
        shown = np.where(excluded & ~np.eye(len(variables), dtype=bool), np.nan, r)
        image = ax.imshow(shown, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
        if len(variables) <= TICKS_MAX:
            ax.set_xticks(range(len(variables)), [_short(v, 34) for v in variables], rotation=45, ha="right")
            ax.set_yticks(range(len(variables)), [_short(v, 34) for v in variables])
        else:  # names would overlap: variable numbers, listed in the table under the figure
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=10, integer=True))
            ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=10, integer=True))
        ax.grid(False)
        marks = len(variables) <= 2 * TICKS_MAX
        for i, j in zip(*np.nonzero(significant), strict=True):
            ax.text(j, i, "*", ha="center", va="center", fontsize=11 if marks else 6, color="black")
        for i, j in zip(*np.nonzero(excluded), strict=True):
            if i != j and marks:
                ax.text(j, i, "\u00d7", ha="center", va="center", fontsize=8, color="#9e9e9e")
        fig.colorbar(image, ax=ax, shrink=0.8, label="r")
        return render(fig, caption)


def scatter(x: Sequence[float], y: Sequence[float], caption: str, xlabel: str = "", ylabel: str = "",
            groups: Sequence[str] | None = None, logx: bool = False, logy: bool = False) -> Plot:
    """A scatter of two variables (one colour per group, e.g. per model)."""
    with _style():
        fig = new_figure(height=3.0, width=4.5)
        ax = fig.add_subplot()
        xs, ys = _array(x), _array(y)
        labels = list(groups) if groups is not None else [""] * len(xs)
        names = list(dict.fromkeys(labels))
        for colour, name in zip(_colours(len(names)), names, strict=True):
            mask = np.array([g == name for g in labels])
            ax.scatter(xs[mask], ys[mask], s=14, color=colour, label=_short(name) if name else None)
        ax.set_xlabel(_short(xlabel, 50))
        ax.set_ylabel(_short(ylabel, 50))
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        if len(names) > 1:
            ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        return render(fig, caption)


def category_grid(grid: Sequence[Sequence[str | None]], colours: Mapping[str, str], caption: str,
                  xlabel: str = "head", ylabel: str = "layer") -> Plot:
    """A layer x head grid of categories, one colour per category (``colours`` in legend order; None blank)."""
    names = list(colours)
    codes = np.array([[np.nan if c is None else names.index(c) for c in row] for row in grid], dtype=np.float64)
    with _style():
        matplotlib, _ = _mpl()
        fig = new_figure(height=min(7.0, 1.0 + 0.28 * len(grid)), width=min(WIDTH, 2.5 + 0.35 * codes.shape[1]))
        ax = fig.add_subplot()
        cmap = matplotlib.colors.ListedColormap([colours[n] for n in names]).with_extremes(bad="#ffffff")
        ax.imshow(np.ma.masked_invalid(codes), cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5, aspect="auto",
                  interpolation="nearest")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(False)
        handles = [matplotlib.patches.Patch(color=colours[n], label=_short(n)) for n in names]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        return render(fig, caption)


def bubble_scatter(x: Sequence[float | None], y: Sequence[float | None], colour: Sequence[float],
                   size: Sequence[float | None], caption: str, xlabel: str = "", ylabel: str = "",
                   colour_label: str = "", logx: bool = False, logy: bool = False) -> Plot:
    """A scatter whose points are coloured by a continuous variable (with a colour bar) and sized by
    another (area proportional to it, scaled to the largest; missing sizes drawn small)."""
    xs, ys, cs, ss = _array(x), _array(y), _array(colour), _array(size)
    finite = ss[np.isfinite(ss)]
    top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    areas = 8 + 80 * np.where(np.isfinite(ss), ss, 0) / top
    with _style():
        fig = new_figure(height=3.2, width=5.0)
        ax = fig.add_subplot()
        points = ax.scatter(xs, ys, c=cs, s=areas, cmap="viridis", alpha=0.8, edgecolors="none")
        ax.set_xlabel(_short(xlabel, 50))
        ax.set_ylabel(_short(ylabel, 50))
        if logx:
            ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        fig.colorbar(points, ax=ax, shrink=0.9, label=_short(colour_label, 30))
        return render(fig, caption)


@dataclass
class Line:
    """One line of a panel, with an optional confidence band (``low`` / ``high``)."""

    label: str
    values: Sequence[float | None]
    low: Sequence[float | None] | None = None
    high: Sequence[float | None] | None = None


@dataclass
class Panel:
    """A small plot of ``lines`` over ``x`` (checkpoint steps or layer positions); ``ticks`` names
    the x positions where they are not numbers, ``spans`` are shaded x intervals (changes)."""

    title: str
    x: Sequence[float]
    lines: Sequence[Line]
    xlabel: str = "step"
    ticks: Sequence[str] | None = None
    spans: Sequence[tuple[float, float]] = ()


def panels(items: Sequence[Panel], caption: str, cols: int = 3) -> Plot:
    """Small multiples of line plots; lines coloured early (dark) to late (light) where a panel has
    several, one legend for the figure; log scale where a panel is positive and spans over 1000x."""
    with _style():
        cols = max(1, min(cols, len(items)))
        rows = -(-len(items) // cols)
        fig = new_figure(height=(1.9 if cols < 4 else 1.75) * rows + 0.35)
        axes = fig.subplots(rows, cols, squeeze=False)
        legend: dict[str, Any] = {}
        for ax, panel in zip(axes.flat, items, strict=False):
            x = np.asarray(panel.x, dtype=np.float64)
            colours = _colours(len(panel.lines)) if len(panel.lines) > 1 else ["#1f77b4"]
            for colour, line in zip(colours, panel.lines, strict=True):
                values = _array(line.values)
                (drawn,) = ax.plot(x, values, marker="o", ms=2.5, lw=1.2, color=colour, label=_short(line.label))
                if line.low is not None and line.high is not None and np.isfinite(_array(line.low)).any():
                    ax.fill_between(x, _array(line.low), _array(line.high), color=colour, alpha=0.2, lw=0)
                if len(panel.lines) > 1:
                    legend.setdefault(_short(line.label), drawn)
            for start, end in panel.spans:
                ax.axvspan(start, end, color="#d62728", alpha=0.15, lw=0)
            everything = np.concatenate([_array(line.values) for line in panel.lines])
            finite = everything[np.isfinite(everything)]
            if finite.size and finite.min() > 0 and finite.max() / finite.min() > 1000:
                ax.set_yscale("log")
            if panel.ticks is not None:
                step = max(1, -(-len(panel.ticks) // 8))
                ax.set_xticks(x[::step], [_short(t, 10) for t in panel.ticks[::step]])
            ax.set_title(_short(panel.title, 44), fontsize=8)
            ax.set_xlabel(panel.xlabel)
        for ax in list(axes.flat)[len(items):]:
            ax.set_visible(False)
        if legend:
            fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncols=min(6, len(legend)),
                       frameon=False, fontsize=7)
        return render(fig, caption)
