"""Reports from a real tiny run over three checkpoints (basic metrics, a per-head test metric
with an interpretation, a metric that fails, a plugin-contributed section) and from synthetic
records: JSON + CSV, HTML (escaped), PDF with a plot in every section, the CLI."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from core_helpers import ONLY_BASIC, synthetic_record
from markupsafe import escape

from tensorscope_core import HeadValue, Interpretation, Metric, Results, RunConfig, ScalarValue, SeriesValue, analyze
from tensorscope_core import plugins as ts_plugins
from tensorscope_core.cli import main
from tensorscope_core.errors import MissingDependencyError, PdfUnavailableError
from tensorscope_core.report import (
    compare,
    discover_correlations,
    generate_html_report,
    generate_pdf_report,
    plots,
    save_report,
)
from tensorscope_core.report.html import render_html
from tensorscope_core.report.pdf import weasyprint_html
from tensorscope_core.results.analysis import ReportRecord
from tensorscope_core.results.schema import LayerValue, MetricResult
from tensorscope_core.testing import random_token_data, tiny_model

STEPS = (3000, 10, 200)  # given out of order: reports order checkpoints by step
SCRIPT = "<script>alert(1)</script>"


class HeadScores(Metric):
    """Per-head query-weight norms and the singular values of layer 0's output weights."""

    name = "t.heads"
    summary = "per-head query norms (a test metric)"
    artifacts = ("weights",)

    def finalize(self) -> dict[str, Any]:
        assert self.view is not None
        grid = [[float(self.view.head_weights(layer).W_Q[h].detach().norm()) for h in range(self.view.n_heads)]
                for layer in range(self.view.n_layers)]
        w_o = self.view.head_weights(0).W_O.detach()
        spectrum = torch.linalg.svdvals(w_o.reshape(-1, w_o.shape[-1]).double()).tolist()
        return {"q_norm": HeadValue(values=grid), "spectrum": SeriesValue(values=spectrum, index_name="rank")}

    @classmethod
    def interpret(cls, result: MetricResult) -> list[Interpretation]:
        grid = np.array(result.value("q_norm"))
        layer, head = np.unravel_index(int(grid.argmax()), grid.shape)
        return [Interpretation(level="hotspot", text="largest query norm", where=f"layer {layer} head {head}")]


class Fails(Metric):
    name = "t.fails"
    artifacts = ("weights",)

    def finalize(self) -> dict[str, Any]:
        raise RuntimeError("planted failure for the report")


def _section(results: Results) -> str | None:
    """A contributed section with its own plot, drawn with the core's plot helpers."""
    rows = [(m.name, v) for m in results.record.models if "t.heads" in m.metrics and m.metrics["t.heads"].ok
            for v in np.ravel(m.metrics["t.heads"].value("q_norm"))]
    if not rows:
        return None
    plot = plots.scatter(list(range(len(rows))), [v for _, v in rows], "query norms of every head",
                         xlabel="head", ylabel="norm", groups=[n for n, _ in rows])
    return f"<p>{escape(len(rows))} heads</p>" + plots.figure_html(plot)


def _registry() -> ts_plugins.Registry:
    def register_metrics(register: Callable[[type], None]) -> None:
        register(HeadScores)
        register(Fails)

    def register_report_sections(register: Callable[..., None]) -> None:
        register("Test plugin section", _section)

    plugin = ts_plugins.plugin_module("x", register_metrics=register_metrics,
                                      register_report_sections=register_report_sections)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ts_plugins.LOAD_ENV, ONLY_BASIC)
        registry = ts_plugins.build_registry(extra_plugins=[("test-report-plugin", plugin)])
    assert not [p for p in registry.plugins if p.status != "ok"]
    return registry


@pytest.fixture(scope="module")
def registry() -> Iterator[ts_plugins.Registry]:
    registry = _registry()
    with ts_plugins.registry_in_use(registry):
        yield registry


@pytest.fixture(autouse=True)
def _use(registry: ts_plugins.Registry) -> Iterator[None]:
    with ts_plugins.registry_in_use(registry):
        yield


@pytest.fixture(scope="module")
def run(registry: ts_plugins.Registry, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three tiny GPT-2 checkpoints analysed together, saved; returns results.json."""
    root = tmp_path_factory.mktemp("report")
    folders = [str(tiny_model("gpt2", root / f"ckpt_step_{s}", seed=s, with_tokenizer=False)) for s in STEPS]
    res = analyze(folders, data=random_token_data(64, n=32, length=12, seed=0),
                  metrics=["basic.loss", "basic.activation_stats", "basic.grad_norms", "basic.weight_norms",
                           "t.heads", "t.fails"], config=RunConfig(batch_size=8))
    res.save(root / "out")
    return root / "out" / "results.json"


@pytest.fixture(scope="module")
def report_html(run: Path) -> tuple[Results, str]:
    res = Results.load(run)
    # tiny models: 3 checkpoints x 2 blocks, tested within checkpoints (n - groups + 1 = 4); the user's settings win
    discover_correlations(res, unit="layer", min_n=4)
    return res, render_html(res)


def _sections(html: str) -> dict[str, str]:
    """section id -> its HTML."""
    found = re.finditer(r'<section class="section[^"]*" id="([^"]+)"[^>]*>(.*?)</section>', html, re.S)
    return {m.group(1): m.group(2) for m in found}


def require(what: str, available: bool) -> None:
    """Missing tools fail in CI (.ci/run installs them) and skip elsewhere."""
    if available:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing in CI; .ci/run installs it")
    pytest.skip(f"{what} is not installed here (CI installs it)")


def _weasyprint_ok() -> bool:
    try:
        weasyprint_html()
    except PdfUnavailableError:
        return False
    return True


# -- HTML --------------------------------------------------------------------------------------
def test_html_has_every_section_with_a_plot_and_lists_the_failure(report_html: tuple[Results, str]) -> None:
    res, html = report_html
    sections = _sections(html)
    assert list(sections)[:3] == ["summary", "comparisons", "correlations"] and list(sections)[-1] == "appendix"
    assert {"plugin-tensorscope-basic", "plugin-test-report-plugin", "contributed-0"} <= set(sections)
    for sid, body in sections.items():  # comparisons are tables: their trajectories are drawn in the families
        assert body.count('class="plot"') >= (sid != "comparisons"), f"section {sid} has no plot"
    appendix = sections["appendix"]
    assert "t.fails" in appendix and "planted failure for the report" in appendix and "RuntimeError" in appendix
    steps = [appendix.index(f"ckpt_step_{s}") for s in sorted(STEPS)]
    assert steps == sorted(steps)  # checkpoints by step, not in the order given
    assert "largest query norm" in sections["plugin-test-report-plugin"]  # the metric's interpretation
    assert "largest query norm" in appendix
    assert "Test plugin section" in html and "heads</p>" in sections["contributed-0"]
    comparisons = sections["comparisons"]
    assert "wilcoxon (n=32)" in comparisons  # basic.loss kept per-sequence values: paired tests
    assert "Kendall" in comparisons and "Cohen&#39;s d" in comparisons


def test_model_names_are_escaped(tmp_path: Path) -> None:
    record = synthetic_record({
        SCRIPT: {"m.x": {"v": ScalarValue(value=1.0), "layers": LayerValue(values=[1.0, 2.0])}},
        "plain": {"m.x": {"v": ScalarValue(value=2.0), "layers": LayerValue(values=[2.0, 1.0])}}})
    res = Results(record)
    path = generate_html_report(res, tmp_path / "report.html")
    html = path.read_text()
    assert "<script" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html.replace("<wbr>", "")  # break hints in long cells
    for uri in re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', html):
        assert "<script" not in base64.b64decode(uri).decode()  # labels in the SVGs are XML-escaped too


def test_a_run_with_failures_renders_and_lists_them() -> None:
    record = synthetic_record(
        {"a": {"m.x": {"v": ScalarValue(value=1.0)}}, "b": {}},
        failed={"a": {"m.y": "CUDA out of memory"}, "b": {"m.x": "NaN in the weights", "m.y": "boom"}})
    record.models[1].metrics["m.z"] = MetricResult(metric="m.z", version="1", plugin="plugin-m",
                                                   status="skipped", reason="needs an encoder")
    html = render_html(Results(record))
    appendix = _sections(html)["appendix"]
    for reason in ("CUDA out of memory", "NaN in the weights", "boom", "needs an encoder"):
        assert reason in appendix
    assert "1 ok, 3 error, 1 skipped" in appendix


def test_single_model_report_has_no_comparison_section() -> None:
    record = synthetic_record({"only": {"m.x": {"v": ScalarValue(value=1.0), "l": LayerValue(values=[1.0, 3.0])}}})
    sections = _sections(render_html(Results(record)))
    assert "comparisons" not in sections and list(sections)[0] == "summary"


# -- JSON, CSV and the round trip ---------------------------------------------------------------
def test_save_report_writes_json_with_comparisons_and_findings_and_the_csv(run: Path, tmp_path: Path) -> None:
    res = Results.load(run)
    found = discover_correlations(res, unit="layer", min_n=5)
    path = save_report(res, tmp_path / "analysis.json")
    assert path == tmp_path / "analysis.json" and (tmp_path / "results.csv").exists()
    with open(tmp_path / "results.csv", newline="") as handle:
        assert handle.read() == res.to_csv()
    raw = json.loads(path.read_text())
    assert {"report_version", "comparisons", "correlations", "models", "schema_version"} <= set(raw)
    ReportRecord.model_validate(raw)
    assert raw["comparisons"]["order"]["steps"] == sorted(STEPS)
    loaded = Results.load(path)
    assert loaded.record == res.record
    assert loaded.comparisons == res.comparisons and loaded.correlations["layer"] == found
    assert save_report(res, tmp_path / "folder").name == "analysis.json"


# -- PDF ---------------------------------------------------------------------------------------
def test_pdf_renders_with_a_plot_in_every_section_but_the_comparison_tables(report_html: tuple[Results, str],
                                                                           tmp_path: Path) -> None:
    require("weasyprint with pango", _weasyprint_ok())
    require("pdftoppm (poppler-utils)", shutil.which("pdftoppm") is not None)
    from PIL import Image

    _, html = report_html
    document = weasyprint_html()(string=html).render()
    pdf = tmp_path / "report.pdf"
    document.write_pdf(pdf)
    anchors = [set(page.anchors) for page in document.pages]
    sections = _sections(html)
    starts = [next(i for i, a in enumerate(anchors) if sid in a) for sid in sections]
    subprocess.run(["pdftoppm", "-png", "-r", "40", str(pdf), str(tmp_path / "page")], check=True)
    pngs = sorted(tmp_path.glob("page-*.png"))
    assert len(pngs) == len(document.pages) >= len(sections)
    for k, (sid, body) in enumerate(sections.items()):
        end = starts[k + 1] if k + 1 < len(starts) else len(anchors)
        plot_ids = set(re.findall(r'<figure class="plot" id="([^"]+)"', body))
        if sid == "comparisons":  # tables only
            continue
        # family and contributed sections flow on: a section may end on the page where the next begins
        pages = [i for i in range(starts[k], min(len(anchors), end + 1)) if anchors[i] & plot_ids]
        assert pages, f"no plot of section {sid} in its pages of the PDF"
        pixels = np.asarray(Image.open(pngs[pages[0]]).convert("RGB")).astype(int)
        coloured = (pixels.max(axis=2) - pixels.min(axis=2) > 60).sum()
        assert coloured > 100, f"page {pages[0] + 1} (section {sid}) shows no coloured plot"


def test_pdf_without_weasyprint_still_writes_the_html(run: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "weasyprint", None)  # as if the extra were not installed
    res = Results.load(run)
    with pytest.raises(PdfUnavailableError) as info:
        generate_pdf_report(res, tmp_path / "report.pdf")
    assert "tensorscope[report]" in info.value.fix and "libpango-1.0-0" in info.value.fix
    assert (tmp_path / "report.html").exists() and str(tmp_path / "report.html") in info.value.fix
    assert not (tmp_path / "report.pdf").exists()


def test_analysis_needs_none_of_the_report_dependencies(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("jinja2", "matplotlib", "pingouin", "weasyprint"):
        monkeypatch.setitem(sys.modules, name, None)
    folder = tiny_model("gpt2", tmp_path / "m", with_tokenizer=False)
    res = analyze(str(folder), metrics=["basic.weight_norms"], data=random_token_data(64, n=4, length=8))
    res.save(tmp_path / "out")
    assert compare(res).scalars  # scipy only: one model, no effect sizes needed
    with pytest.raises(MissingDependencyError, match="jinja2|matplotlib") as info:
        generate_html_report(res, tmp_path / "r.html")
    assert "tensorscope[report]" in info.value.fix


# -- CLI ---------------------------------------------------------------------------------------
def test_cli_report(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["report", str(run), "--html", str(tmp_path / "r.html"), "--save-json", str(tmp_path / "a.json"),
                 "--unit", "layer", "--min-n", "5", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out
    assert out["wrote"] == {"json": str(tmp_path / "a.json"), "html": str(tmp_path / "r.html")}
    assert "Correlations between metrics" in (tmp_path / "r.html").read_text()
    assert json.loads((tmp_path / "a.json").read_text())["correlations"][0]["min_n"] == 5
    assert main(["report", str(tmp_path / "missing.json")]) == 1
    assert main(["report", str(run), "--order", "nope,ckpt", "--html", str(tmp_path / "x.html")]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(run), "--unit", "token"])
    assert exit_info.value.code == 2


def test_cli_pdf_unavailable_exits_1_after_writing_html(run: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "weasyprint", None)
    code = main(["report", str(run), "--pdf", str(tmp_path / "r.pdf")])
    err = capsys.readouterr().err
    assert code == 1
    assert "tensorscope[report]" in err and "libpango" in err and str(tmp_path / "r.html") in err
    assert (tmp_path / "r.html").exists() and not (tmp_path / "r.pdf").exists()


def test_cli_help_names_the_report_command() -> None:
    done = subprocess.run([sys.executable, "-m", "tensorscope_core.cli", "report", "--help"], capture_output=True,
                          text=True, check=True)
    assert "usage: tensorscope report" in done.stdout and "--pdf" in done.stdout
