"""matplotlib figures for reports, embedded as SVG (``<img src="data:image/svg+xml;base64,...">``).

Figures are built on ``matplotlib.figure.Figure`` (no pyplot state, no GUI backend).
Text stays text (smaller SVGs, searchable PDFs); ``$`` in names is escaped so no name is
read as mathtext, and matplotlib XML-escapes ``<``. A data URI keeps each SVG's ids to itself.
Plugins use ``figure_html`` and the plot functions for their own report sections.
"""

from __future__ import annotations

import base64
import io
import itertools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import MissingDependencyError

WIDTH = 7.0  # inches: the text width of an A4 page with 15 mm margins
STATUS_COLOURS = {"ok": "#4caf50", "error": "#e53935", "skipped": "#bdbdbd", "absent": "#ffffff"}
_plot_ids = itertools.count(1)


@dataclass
class Plot:
    """One rendered figure: an SVG data URI and its caption."""

    uri: str
    caption: str
    id: str


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
    """Serialise ``fig`` to an SVG data URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    uri = "data:image/svg+xml;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return Plot(uri=uri, caption=caption, id=f"plot-{next(_plot_ids)}")


def figure_html(plot: Plot) -> str:
    """HTML of a plot for a plugin's report section (caption escaped)."""
    from markupsafe import escape

    return (f'<figure class="plot" id="{plot.id}"><img alt="{escape(plot.caption)}" src="{plot.uri}">'
            f"<figcaption>{escape(plot.caption)}</figcaption></figure>")


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
    """Models x metrics coloured by ok / error / skipped."""
    with _style():
        matplotlib, _ = _mpl()
        order = list(STATUS_COLOURS)
        grid = np.array([[order.index(status.get((m, k), "absent")) for k in metrics] for m in models])
        fig = new_figure(height=min(8.0, 0.6 + 0.22 * len(models) + 0.05 * max(len(k) for k in metrics)))
        ax = fig.add_subplot()
        cmap = matplotlib.colors.ListedColormap([STATUS_COLOURS[s] for s in order])
        ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(order) - 0.5, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(len(metrics)), [_short(k, 34) for k in metrics], rotation=40, ha="right")
        ax.set_yticks(range(len(models)), [_short(m) for m in models])
        ax.grid(False)
        ax.set_xticks(np.arange(-0.5, len(metrics)), minor=True)
        ax.set_yticks(np.arange(-0.5, len(models)), minor=True)
        ax.grid(which="minor", color="white", linewidth=2)
        ax.tick_params(which="minor", length=0)
        handles = [matplotlib.patches.Patch(color=STATUS_COLOURS[s], label=s) for s in order[:3]]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
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


def heatmaps(grids: Mapping[str, Sequence[Sequence[float | None]]], caption: str, xlabel: str = "head",
             ylabel: str = "layer", max_panels: int = 6) -> Plot:
    """Small multiples of layer x head grids on one colour scale (at most ``max_panels``, evenly chosen)."""
    names = list(grids)
    if len(names) > max_panels:
        names = [names[round(i)] for i in np.linspace(0, len(names) - 1, max_panels)]
    arrays = [np.array([_array(row) for row in grids[n]]) for n in names]
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays]) if arrays else np.array([])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    with _style():
        matplotlib, _ = _mpl()
        cols = min(3, len(names))
        rows = -(-len(names) // cols)
        fig = new_figure(height=2.3 * rows + 0.3)
        axes = fig.subplots(rows, cols, squeeze=False)
        image = None
        for ax, name, grid in zip(axes.flat, names, arrays, strict=False):
            image = ax.imshow(grid, cmap="magma", vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
            ax.set_title(_short(name, 30))
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.grid(False)
        for ax in list(axes.flat)[len(names):]:
            ax.set_visible(False)
        if image is not None:
            fig.colorbar(image, ax=axes, shrink=0.8)
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
        ax.set_xticks(range(len(variables)), [_short(v, 34) for v in variables], rotation=45, ha="right")
        ax.set_yticks(range(len(variables)), [_short(v, 34) for v in variables])
        ax.grid(False)
        for i, j in zip(*np.nonzero(significant), strict=True):
            ax.text(j, i, "*", ha="center", va="center", fontsize=11, color="black")
        for i, j in zip(*np.nonzero(excluded), strict=True):
            if i != j:
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
