"""The report a researcher reads in ten minutes, rendered from real runs of four metric families
on four tiny checkpoints, with a change table like the one dynamics.phase_transitions writes:
the executive page comes first and names the largest change, every per-head field has one
colour scale across checkpoints, no bookkeeping field or CI bound gets a figure, the page and
figure counts stay under bounds, and no text leaves the page."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tensorscope_core import RunConfig, analyze
from tensorscope_core.errors import PdfUnavailableError
from tensorscope_core.report import compare, plots
from tensorscope_core.report.html import render_html, trim_tables
from tensorscope_core.report.pdf import weasyprint_html
from tensorscope_core.report.selection import bookkeeping, ci_bound, relative_change, step_axis
from tensorscope_core.results import Results
from tensorscope_core.results.schema import MetricResult, TableValue
from tensorscope_core.stats import InsufficientSampleWarning
from tensorscope_core.testing import random_token_data, tiny_model

STEPS = (0, 100, 200, 300)
METRICS = ["basic.loss", "basic.weight_norms", "circuits.head_scores", "circuits.attention_entropy", "fisher.lanczos"]
#: bounds for this run (4 checkpoints, 5 metrics of 3 families): the demo's 50 metrics stay under ~30 / ~40
MAX_PAGES = 14
MAX_FIGURES = 14
#: the planted change points: (series, before, after)
CHANGES = [("basic.weight_norms.total_norm", "step-100", "step-200"), ("basic.loss.loss", "step-200", "step-300"),
           ("circuits.head_scores.induction_max[1]", "step-0", "step-100")]


def _checkpoints(root: Path) -> dict[str, str]:
    """One tiny GPT-2 whose weights grow by half their initial size per checkpoint, as training
    grows them: the loss, the norms and the attention patterns move from checkpoint to checkpoint."""
    import transformers as tf

    base = tiny_model("gpt2", root / "base", seed=0, with_tokenizer=False)
    folders = {}
    for k, step in enumerate(STEPS):
        model = tf.AutoModelForCausalLM.from_pretrained(base)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.0 + 0.5 * k)
        model.save_pretrained(root / f"step-{step}")
        folders[f"step-{step}"] = str(root / f"step-{step}")
    return folders


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Results:
    folders = _checkpoints(tmp_path_factory.mktemp("render"))
    res = analyze(folders, data=random_token_data(64, n=32, length=12, seed=0), metrics=METRICS,
                  params={"fisher.lanczos": {"k": 2, "max_iter": 6, "max_examples": 4}}, config=RunConfig(batch_size=8))
    table = TableValue(columns=["series", "model_before", "model_after"], rows=[list(c) for c in CHANGES])
    res.record.model_set["detector.changes"] = MetricResult(metric="detector.changes", version="1", plugin="p",
                                                            status="ok", values={"changes": table})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsufficientSampleWarning)  # 4 checkpoints: trends are described only
        compare(res)
    return res


class Drawn:
    """What the report drew: panel titles, heatmap captions, and the colour limits of each image."""

    def __init__(self) -> None:
        self.titles: list[str] = []
        self.captions: dict[int, str] = {}  # id(figure) -> caption
        self.limits: dict[int, list[tuple[float | None, float | None]]] = {}
        self.figures: list[Any] = []  # kept alive, so no figure's id is reused by another


@pytest.fixture(scope="module")
def rendered(run: Results) -> Iterator[tuple[str, Drawn]]:
    from matplotlib.axes import Axes

    drawn = Drawn()
    panels, render, imshow = plots.panels, plots.render, Axes.imshow

    def spy_panels(items: Any, caption: str, cols: int = 3) -> Any:
        drawn.titles += [p.title for p in items]
        return panels(items, caption, cols)

    def spy_render(fig: Any, caption: str) -> Any:
        drawn.captions[id(fig)] = caption
        drawn.figures.append(fig)
        return render(fig, caption)

    def spy_imshow(ax: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
        drawn.limits.setdefault(id(ax.figure), []).append((kwargs.get("vmin"), kwargs.get("vmax")))
        drawn.figures.append(ax.figure)
        return imshow(ax, data, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plots, "panels", spy_panels)
        mp.setattr(plots, "render", spy_render)
        mp.setattr(Axes, "imshow", spy_imshow)
        yield render_html(run), drawn


def _sections(html: str) -> dict[str, str]:
    found = re.finditer(r'<section class="section[^"]*" id="([^"]+)"[^>]*>(.*?)</section>', html, re.S)
    return {m.group(1): m.group(2) for m in found}


def _largest_change(res: Results) -> str:
    """The planted change with the largest |after - before| over its field's largest |value| (over every
    model, and every layer of a per-layer field), from the record."""
    models = {m.name: m for m in res.record.models}

    def field(series: str) -> tuple[str, str, int | None]:
        layer = re.match(r"^(.*)\[(\d+)\]$", series)
        metric, name = (layer.group(1) if layer else series).rsplit(".", 1)
        return metric, name, int(layer.group(2)) if layer else None

    def values(series: str, model: str) -> list[float]:
        metric, name, _ = field(series)
        got = models[model].metrics[metric].value(name)
        return [float(v) for v in (got if isinstance(got, list) else [got])]

    def size(change: tuple[str, str, str]) -> float:
        i = field(change[0])[2] or 0
        a, b = values(change[0], change[1])[i], values(change[0], change[2])[i]
        scale = max(abs(v) for m in models for v in values(change[0], m))
        return abs(b - a) / scale

    return max(CHANGES, key=size)[0]


# -- the pages' content --------------------------------------------------------------------------
def test_the_executive_page_comes_first_and_names_the_largest_change(run: Results,
                                                                      rendered: tuple[str, Drawn]) -> None:
    html, drawn = rendered
    sections = _sections(html)
    assert list(sections)[0] == "summary" and list(sections)[-1] == "appendix"
    summary = sections["summary"]
    assert f"Largest change for its scale: {_largest_change(run)}" in summary.replace("<wbr>", "")
    assert "The loss changed between step 200 → 300" in summary
    assert "3 change points" in summary
    assert summary.count('class="plot"') == 1  # one headline figure: loss and induction per layer by step
    assert {"basic.loss.loss", "induction score per layer (max over heads)"} <= set(drawn.titles)


def test_per_head_fields_share_one_colour_scale_across_checkpoints(run: Results,
                                                                   rendered: tuple[str, Drawn]) -> None:
    _, drawn = rendered
    heatmaps = {fid: caption for fid, caption in drawn.captions.items() if " per head: one colour scale" in caption}
    assert heatmaps, "no per-head heatmap drawn"
    for fid, caption in heatmaps.items():
        field = caption.split(" per head")[0]
        metric, name = field.rsplit(".", 1)
        grids = [np.array(m.metrics[metric].value(name), dtype=float) for m in run.record.models]
        assert len(drawn.limits[fid]) == len(STEPS), caption  # one panel per checkpoint
        low = min(float(np.nanmin(g)) for g in grids)
        high = max(float(np.nanmax(g)) for g in grids)
        expected = (0.0, 1.0) if 0 <= low and high <= 1 else (-1.0, 1.0) if -1 <= low and high <= 1 else (low, high)
        assert set(drawn.limits[fid]) == {expected}, caption
    assert any(c.startswith("circuits.head_scores.induction per head") for c in heatmaps.values())
    induction = next(fid for fid, c in heatmaps.items() if c.startswith("circuits.head_scores.induction per"))
    assert set(drawn.limits[induction]) == {(0.0, 1.0)}  # scores: a small score is dark on every checkpoint


def test_no_figure_for_bookkeeping_fields_or_ci_bounds(rendered: tuple[str, Drawn]) -> None:
    html, drawn = rendered
    named = drawn.titles + list(drawn.captions.values())
    for name in ("iterations", "n_examples", "n_params", "converged", "_ci_low", "_ci_high"):
        assert not [t for t in named if name in t], name
    assert "fisher.lanczos.lambda_max" in drawn.titles  # its value is drawn, its bookkeeping is not
    appendix = _sections(html)["appendix"].replace("<wbr>", "")
    assert re.search(r"bookkeeping[^<]*fisher\.lanczos\.iterations", appendix)


def test_checkpoints_are_spaced_by_step() -> None:
    assert step_axis([0, 25, 50, 300]) == ([0.0, 25.0, 50.0, 300.0], "step")
    assert step_axis([None, 5]) == ([0.0, 1.0], "checkpoint")


def test_counts_stay_under_their_bounds(rendered: tuple[str, Drawn]) -> None:
    html, _ = rendered
    assert html.count("<img") <= MAX_FIGURES


# -- the PDF ------------------------------------------------------------------------------------
def _weasyprint_ok() -> bool:
    try:
        weasyprint_html()
    except PdfUnavailableError:
        return False
    return True


@pytest.mark.skipif(not _weasyprint_ok(), reason="weasyprint with pango is not installed (the report extra)")
def test_pdf_pages_hold_their_text_and_start_with_the_summary(run: Results, rendered: tuple[str, Drawn],
                                                               tmp_path: Path) -> None:
    pdfplumber = pytest.importorskip("pdfplumber")
    html, _ = rendered
    path = tmp_path / "report.pdf"
    weasyprint_html()(string=html).write_pdf(path)
    with pdfplumber.open(path) as pdf:
        assert len(pdf.pages) <= MAX_PAGES
        first = re.sub(r"\s+", "", pdf.pages[0].extract_text())
        assert "Summary" in first and _largest_change(run) in first
        for number, page in enumerate(pdf.pages, 1):
            outside = [c["text"] for c in page.chars if c["x0"] < 0 or c["x1"] > page.width + 0.5
                       or c["top"] < 0 or c["bottom"] > page.height + 0.5]
            assert not outside, f"page {number}: text off the page: {''.join(outside)[:80]}"
            assert all(i["x1"] <= page.width + 0.5 for i in page.images), f"page {number}: a figure is too wide"


# -- the parts -------------------------------------------------------------------------------------
def test_bookkeeping_and_ci_bounds_are_recognised_by_name() -> None:
    assert all(bookkeeping(f) for f in ("n_examples", "iterations", "true/n_entries", "batches", "tokens", "seed"))
    assert not any(bookkeeping(f) for f in ("loss", "induction", "lambda_max", "entropy", "snr"))
    assert ci_bound("induction_ci_low") == "induction" and ci_bound("entropy") is None


def test_relative_change_is_the_largest_entry_change_over_the_magnitude() -> None:
    assert relative_change([np.array([1.0, 2.0]), np.array([1.0, 4.0])]) == pytest.approx(0.5)
    assert relative_change([np.array(3.0), np.array(3.0)]) == 0.0
    assert np.isnan(relative_change([np.array(1.0)]))


def test_a_contributed_section_keeps_its_last_figures_and_drops_the_other_models() -> None:
    with plots.figure_budget(3) as budget:
        parts = []
        for model in ("a", "b", "c"):
            figures = [plots.render(plots.new_figure(1.0), f"{model}{i}") for i in range(2)]
            parts.append(f"<h3>{model}</h3>" + "".join(plots.figure_html(f) for f in figures) + f"<p>{model}</p>")
        html = "<p>intro</p>" + "".join(parts)
    shown = budget.resolve(html)
    assert budget.dropped == 3
    assert re.findall(r'alt="([^"]+)"', shown) == ["b1", "c0", "c1"]
    assert "<h3>a</h3>" not in shown and "<p>a</p>" not in shown  # model a lost every figure: its part goes
    assert shown.startswith("<p>intro</p>") and "<h3>b</h3>" in shown


def test_contributed_tables_are_cut_with_a_note() -> None:
    rows = "".join(f"<tr><td>{i}</td></tr>" for i in range(20))
    cut = trim_tables(f"<table><tr><th>i</th></tr>{rows}</table>", rows=5)
    assert re.findall(r"<td>(\d+)</td>", cut) == ["0", "1", "2", "3", "4"]
    assert "first 5 of 20 rows" in cut and "<th>i</th>" in cut

