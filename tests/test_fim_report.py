"""`tensorscope fim`: the FIM workflow's files from a real tiny run of two checkpoints hold the values of
results.json exactly, categories are found by grep, and the categories follow the workflow's rules."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from tensorscope_core import RunConfig, analyze
from tensorscope_core.cli import main
from tensorscope_core.fim_report import write_fim_files
from tensorscope_core.results import Results
from tensorscope_core.testing import random_token_data, tiny_model

pytest.importorskip("tensorscope_fisher")
MODELS = ("ckpt-100", "ckpt-200")


@pytest.fixture(scope="module")
def fim_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Results, Path]:
    root = tmp_path_factory.mktemp("fim")
    models = {name: tiny_model("gpt2", root / name, seed=seed) for seed, name in enumerate(MODELS)}
    res = analyze(models, data=random_token_data(300, n=8, length=12, seed=4),
                  metrics=["fisher.hotspots", "fisher.hotspots_compare"], config=RunConfig(batch_size=4))
    res.save(root / "run")
    assert main(["fim", str(root / "run" / "results.json"), "--out", str(root / "fim")]) == 0
    return Results.load(root / "run"), root / "fim"


def _csv_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "fim_summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_summary_csv_holds_the_results_exactly(fim_run: tuple[Results, Path]) -> None:
    res, folder = fim_run
    rows = _csv_rows(folder)
    assert list(rows[0]) == ["run_name", "layer", "head", "metric", "value", "category"]
    cells = {(r["run_name"], r["layer"], r["head"], r["metric"]): r for r in rows}
    assert len(cells) == len(rows) == 2 * ((2 * 4 + 2) * 6 + 2 * 4 * 3)
    for model in MODELS:
        spectrum, hot = res.get("fisher.spectrum", model=model), res.get("fisher.hotspots", model=model)
        category = hot.value("category")
        names = ("high_potential", "moderate", "critical")
        for layer in range(2):
            for head in range(4):
                for metric in ("trace", "eigmax", "cond", "energy_r8", "energy_r16", "effective_rank"):
                    row = cells[(model, str(layer), str(head), metric)]
                    assert float(row["value"]) == spectrum.value(f"attn_{metric}")[layer][head]  # exactly
                    assert row["category"] == names[int(category[layer][head])]
            mlp = cells[(model, str(layer), "mlp", "trace")]
            assert float(mlp["value"]) == spectrum.value("mlp_trace")[layer] and mlp["category"] == ""
        for layer, head, _, fraction, *_, potential, efficiency in hot.values["categories"].rows:
            assert float(cells[(model, str(layer), str(head), "trace_fraction")]["value"]) == fraction
            assert float(cells[(model, str(layer), str(head), "compression_potential")]["value"]) == potential
            assert float(cells[(model, str(layer), str(head), "efficiency_score")]["value"]) == efficiency


def test_categories_follow_the_workflow_rules_and_grep_finds_them(fim_run: tuple[Results, Path]) -> None:
    """Recomputed from fisher.spectrum: critical = trace / max trace > 0.95; high_potential = cond ≥ the
    median head's and energy_r8 ≥ 0.9 (8 sequences: every energy_r8 is 1), not critical."""
    res, folder = fim_run
    lines = (folder / "fim_summary.csv").read_text().splitlines()
    for model in MODELS:
        spectrum = res.get("fisher.spectrum", model=model)
        trace, cond = spectrum.value("attn_trace"), spectrum.value("attn_cond")
        top, bound = max(sum(trace, [])), statistics.median(sum(cond, []))
        expect = {}
        for layer in range(2):
            for head in range(4):
                expect[(layer, head)] = ("critical" if trace[layer][head] / top > 0.95 else "high_potential"
                                         if cond[layer][head] >= bound else "moderate")
        found = {c: {(int(line.split(",")[1]), int(line.split(",")[2])) for line in lines
                     if c in line and line.startswith(model + ",")} for c in ("critical", "high_potential")}
        for c in found:  # grep CATEGORY fim_summary.csv lists exactly that category's heads
            assert found[c] == {k for k, v in expect.items() if v == c}
        assert len(found["critical"]) >= 1 and len(found["high_potential"]) >= 1
        tall = [line.split(",") for line in (folder.parent / "run" / "results.csv").read_text().splitlines()
                if "high_potential" in line and line.startswith(f"{model},")]  # grep high_potential results.csv
        assert {(int(r[1]), int(r[2])) for r in tall if r[4] == "categories.category"} == found["high_potential"]
        text = (folder / "fim.txt").read_text()
        for layer, head in found["high_potential"]:
            assert f"high_potential {model} layer {layer} head {head}:" in text


def test_fim_text_has_every_section_with_the_stored_values(fim_run: tuple[Results, Path]) -> None:
    res, folder = fim_run
    text = (folder / "fim.txt").read_text()
    for section in ("Global statistics", "Cross-run comparison", "Hotspots", "Interpretation guide"):
        assert f"== {section}" in text
    stats = {line.split()[0]: line.split()[1:] for line in text.split("== Global statistics")[1]
             .split("\n\n")[0].splitlines()[1:]}
    assert stats["statistic"] == list(MODELS)
    for name in ("total_trace", "mean_eigmax", "median_cond", "mean_energy_r8", "mean_effective_rank",
                 "compression_potential", "efficiency_score"):
        assert [float(v) for v in stats[name]] == [res.get("fisher.hotspots", model=m).value(name) for m in MODELS]
    assert res.get("fisher.hotspots_compare").values["summary"].text in text
    assert res.get("fisher.hotspots", model=MODELS[0]).values["guide"].text in text and "How to read" in text
    top = res.get("fisher.hotspots", model=MODELS[1]).values["hotspots"].rows[0]
    assert f"top_trace #1: layer {top[2]} head {top[3]} ({top[4]!r})" in text


def test_one_model_and_missing_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_model("gpt2", tmp_path / "m", seed=0)
    data = random_token_data(300, n=4, length=8, seed=1)
    analyze(model, data=data, metrics=["fisher.hotspots"]).save(tmp_path / "one")
    assert main(["fim", str(tmp_path / "one"), "--out", str(tmp_path / "fim")]) == 0
    assert "one run: nothing to compare" in (tmp_path / "fim" / "fim.txt").read_text()
    analyze(model, data=data, metrics=["basic.loss"]).save(tmp_path / "loss")
    capsys.readouterr()
    assert main(["fim", str(tmp_path / "loss"), "--out", str(tmp_path / "x"), "--json"]) == 2
    error = json.loads(capsys.readouterr().out)
    assert error["error"] == "UsageError" and "no ok fisher.hotspots result" in error["problem"]
    assert "--metrics fisher.hotspots" in error["fix"] and not (tmp_path / "x").exists()


def test_a_model_without_hotspots_is_named_and_left_out(fim_run: tuple[Results, Path], tmp_path: Path) -> None:
    res = Results.load(fim_run[1].parent / "run")
    failed = res.record.models[1].metrics["fisher.hotspots"]
    res.record.models[1].metrics["fisher.hotspots"] = failed.model_copy(
        update={"status": "error", "reason": "planted failure", "values": {}})
    paths = write_fim_files(res, tmp_path)
    text, rows = paths["txt"].read_text(), _csv_rows(tmp_path)
    assert "left out, no ok fisher.hotspots: ckpt-200 (error: planted failure)" in text
    assert {r["run_name"] for r in rows} == {"ckpt-100"} and "one run: nothing to compare" in text
