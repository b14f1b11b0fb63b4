"""Results: save/load round trip (tensors beside the JSON), the tall CSV table,
reproducibility, the content-addressed cache and resume, atomic writes, lookups."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from core_helpers import BASIC, values_of

from tensorscope_core import (
    HeadValue,
    LayerValue,
    Metric,
    Results,
    RunConfig,
    Step,
    TableValue,
    TensorValue,
    TextValue,
    analyze,
)
from tensorscope_core.errors import ResultsFormatError
from tensorscope_core.results.schema import SCHEMA_VERSION
from tensorscope_core.results.table import COLUMNS
from tensorscope_core.testing import check_roundtrip

pytestmark = pytest.mark.usefixtures("basic_only")

CFG = RunConfig(batch_size=4, max_length=32)


class TensorOut(Metric):
    """Every kind of value a metric may return."""

    name = "t.tensor"
    artifacts = ("weights",)

    def finalize(self) -> dict[str, Any]:
        return {
            "matrix": torch.arange(12, dtype=torch.float32).reshape(3, 4),
            "one": torch.tensor(2.5),
            "series": [1.0, 2.0, 4.0],
            "grid": HeadValue(values=[[1.0, 2.0], [3.0, None]]),
            "labelled": LayerValue(values=[0.5, 0.25], labels=["embed", "final"]),
            "table": TableValue(columns=["a", "b"], rows=[[1, "x"], [2, "y"]]),
            "heads": TableValue(columns=["layer", "head", "category", "score"],
                                rows=[[0, 1, "high_potential", 0.5], [1, "mlp", "critical", None]]),
            "text": TextValue(text="hello"),
            "nan": float("nan"),
        }


class Flaky(Metric):
    """Fails while ``Flaky.fail`` is set (a run that crashed part-way, then is resumed)."""

    name = "t.flaky"
    artifacts = ("token_loss",)
    fail = True
    runs = 0

    def setup(self) -> None:
        Flaky.runs += 1
        self.total = 0.0

    def update(self, step: Step) -> None:
        if Flaky.fail:
            raise RuntimeError("interrupted on purpose")
        self.total += float(step["token_loss"].sum())

    def finalize(self) -> dict[str, Any]:
        return {"total": self.total, "vector": torch.linspace(0, 1, 5)}


def _row_key(row: dict[str, str]) -> tuple[str, ...]:
    return tuple(row[c] for c in ("metric", "field", "layer", "head", "index"))


def test_roundtrip_with_tensors(use_registry: Callable[..., Any], model_dirs: dict[str, Path],
                                tokens: torch.Tensor, tmp_path: Path) -> None:
    use_registry(TensorOut)
    res = analyze(str(model_dirs["gpt2"]), data=tokens, metrics=["t.tensor", *BASIC], config=CFG)
    result = res.get("t.tensor")
    assert result.ok, result.reason
    matrix = result.values["matrix"]
    assert isinstance(matrix, TensorValue) and matrix.shape == [3, 4] and matrix.dtype == "float32"
    assert torch.equal(res.tensor("t.tensor", "matrix"), torch.arange(12, dtype=torch.float32).reshape(3, 4))
    assert result.value("one") == 2.5 and result.value("series") == [1.0, 2.0, 4.0]
    assert result.value("nan") is None  # NaN is written as null
    loaded = check_roundtrip(res, tmp_path / "out")
    assert (tmp_path / "out" / "tensors.safetensors").exists()
    assert torch.equal(loaded.tensor("t.tensor", "matrix"), res.tensor("t.tensor", "matrix"))
    assert loaded.get("t.tensor").values["text"].text == "hello"
    assert loaded.get("basic.loss").value("loss") == res.get("basic.loss").value("loss")
    # the JSON is plain JSON (no NaN tokens) with the schema version at the root
    raw = json.loads((tmp_path / "out" / "results.json").read_text())
    assert raw["schema_version"] == SCHEMA_VERSION == "1.4"
    assert raw["models"][0]["metrics"]["t.tensor"]["values"]["nan"]["value"] is None


def test_csv_is_the_tall_table(use_registry: Callable[..., Any], model_dirs: dict[str, Path], tokens: torch.Tensor,
                               tmp_path: Path) -> None:
    use_registry(TensorOut)
    folder = str(model_dirs["llama"])
    res = analyze(folder, data=tokens, metrics=["t.tensor", "basic.loss", "basic.activation_stats"], config=CFG)
    res.save(tmp_path)
    with open(tmp_path / "results.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["run", "layer", "head", "metric", "field", "index", "value", "ci_low", "ci_high"]
        rows = {_row_key(r): r for r in reader}
    assert list(COLUMNS) == ["run", "layer", "head", "metric", "field", "index", "value", "ci_low", "ci_high"]
    loss = res.get("basic.loss").values["loss"]
    row = rows[("basic.loss", "loss", "", "", "")]
    assert row["run"] == Path(folder).name
    assert float(row["value"]) == loss.value
    assert (float(row["ci_low"]), float(row["ci_high"])) == (loss.ci_low, loss.ci_high)
    assert loss.ci_low < loss.value < loss.ci_high
    resid = res.get("basic.activation_stats").value("resid_norm")
    assert len(resid) == 3
    for layer, v in enumerate(resid):
        assert float(rows[("basic.activation_stats", "resid_norm", str(layer), "", "")]["value"]) == v
    assert float(rows[("t.tensor", "grid", "1", "0", "")]["value"]) == 3.0
    assert rows[("t.tensor", "grid", "1", "1", "")]["value"] == ""  # null stays empty
    assert float(rows[("t.tensor", "series", "", "", "2")]["value"]) == 4.0
    assert float(rows[("t.tensor", "labelled", "final", "", "")]["value"]) == 0.25
    assert not any(k[0] == "t.tensor" and k[1] in ("matrix", "text") for k in rows)  # not tall values
    # a table: a row per cell, field <field>.<column>, index the table row; layer / head columns are keys
    assert [rows[("t.tensor", f"table.{c}", "", "", str(i))]["value"] for i in (0, 1) for c in "ab"] == \
        ["1", "x", "2", "y"]
    assert rows[("t.tensor", "heads.category", "0", "1", "0")]["value"] == "high_potential"
    assert float(rows[("t.tensor", "heads.score", "0", "1", "0")]["value"]) == 0.5
    assert rows[("t.tensor", "heads.category", "1", "mlp", "1")]["value"] == "critical"
    assert rows[("t.tensor", "heads.score", "1", "mlp", "1")]["value"] == ""  # null stays empty
    assert not any(k[0] == "t.tensor" and k[1] in ("heads.layer", "heads.head") for k in rows)
    assert sum(k[1].startswith(("table.", "heads.")) for k in rows) == 8
    table = res.table()
    assert list(table.columns) == list(COLUMNS) and len(table) == len(rows)
    assert res.to_csv() == (tmp_path / "results.csv").read_bytes().decode()


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_same_seed_same_values(model_dirs: dict[str, Path], tokens: torch.Tensor, family: str) -> None:
    folder = str(model_dirs[family])
    one = analyze(folder, data=tokens, metrics=list(BASIC), config=CFG)
    two = analyze(folder, data=tokens, metrics=list(BASIC), config=CFG)
    for name in BASIC:
        assert values_of(one.get(name)) == values_of(two.get(name)), name
    assert one.model().fingerprint == two.model().fingerprint
    assert one.model().data_fingerprint == two.model().data_fingerprint
    if family == "bert":  # the masked-LM mask is drawn from the seed: another seed, another loss
        other = analyze(folder, data=tokens, metrics=["basic.loss"], config=CFG.model_copy(update={"seed": 1}))
        assert other.get("basic.loss").value("loss") != one.get("basic.loss").value("loss")


def _no_temporary_files(folder: Path) -> None:
    leftovers = [p.name for p in folder.rglob("*") if p.name.startswith(".")]
    assert leftovers == [], leftovers


def test_cache_returns_finished_metrics(use_registry: Callable[..., Any], model_dirs: dict[str, Path],
                                        tokens: torch.Tensor, tmp_path: Path) -> None:
    use_registry(TensorOut)
    folder = str(model_dirs["gpt2"])
    config = CFG.model_copy(update={"cache_dir": tmp_path / "cache"})
    metrics = [*BASIC, "t.tensor"]
    first = analyze(folder, data=tokens, metrics=metrics, config=config)
    assert not any(r.from_cache for r in first.model().metrics.values())
    second = analyze(folder, data=tokens, metrics=metrics, config=config)
    for name in metrics:
        assert second.get(name).from_cache, name
        assert values_of(second.get(name)) == values_of(first.get(name)), name
    assert second.model().passes == {}  # nothing had to be recomputed
    assert torch.equal(second.tensor("t.tensor", "matrix"), first.tensor("t.tensor", "matrix"))
    _no_temporary_files(tmp_path / "cache")
    # what changes the numbers changes the key: another seed or other data recompute
    reseeded = analyze(folder, data=tokens, metrics=["basic.loss"], config=config.model_copy(update={"seed": 3}))
    assert not reseeded.get("basic.loss").from_cache
    other_data = analyze(folder, data=tokens[:8], metrics=["basic.loss"], config=config)
    assert not other_data.get("basic.loss").from_cache
    # settings that do not change numbers (the time limit, the budget) keep the key
    relaxed = analyze(folder, data=tokens, metrics=["basic.loss"],
                      config=config.model_copy(update={"metric_timeout_s": 100.0, "memory_budget": "8GiB"}))
    assert relaxed.get("basic.loss").from_cache


def test_resume_recomputes_only_the_metric_that_failed(use_registry: Callable[..., Any],
                                                       model_dirs: dict[str, Path], tokens: torch.Tensor,
                                                       tmp_path: Path) -> None:
    use_registry(Flaky)
    folder = str(model_dirs["llama"])
    config = CFG.model_copy(update={"cache_dir": tmp_path / "cache"})
    metrics = ["basic.loss", "basic.grad_norms", "basic.weight_norms", "t.flaky"]
    Flaky.fail, Flaky.runs = True, 0
    first = analyze(folder, data=tokens, metrics=metrics, config=config)
    assert first.get("t.flaky").status == "error"
    assert all(first.get(m).ok for m in metrics[:3])
    Flaky.fail = False
    resumed = analyze(folder, data=tokens, metrics=metrics, config=config)
    assert {m: resumed.get(m).from_cache for m in metrics} == {
        "basic.loss": True, "basic.grad_norms": True, "basic.weight_norms": True, "t.flaky": False}
    assert resumed.get("t.flaky").ok and Flaky.runs == 2
    assert resumed.model().passes == {"forward": 3}  # only the flaky metric's pass, and no backward
    for m in metrics[:3]:
        assert values_of(resumed.get(m)) == values_of(first.get(m)), m
    # the recomputed value is right: the summed token loss is the mean loss times the tokens
    loss = resumed.get("basic.loss").values["loss"]
    assert resumed.get("t.flaky").value("total") == pytest.approx(loss.value * loss.n, rel=1e-5)
    again = analyze(folder, data=tokens, metrics=metrics, config=config)
    assert all(again.get(m).from_cache for m in metrics) and Flaky.runs == 2
    assert torch.equal(again.tensor("t.flaky", "vector"), torch.linspace(0, 1, 5))
    _no_temporary_files(tmp_path / "cache")


def test_save_leaves_no_temporary_files(use_registry: Callable[..., Any], model_dirs: dict[str, Path],
                                        tokens: torch.Tensor, tmp_path: Path) -> None:
    use_registry(TensorOut)
    res = analyze(str(model_dirs["neox"]), data=tokens, metrics=["t.tensor", "basic.loss"], config=CFG)
    out = tmp_path / "nested" / "out"
    res.save(out)
    res.save(out)  # overwriting is atomic too
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.json", "tensors.safetensors"]
    _no_temporary_files(tmp_path)


def test_get_by_model_name_with_or_without_trailing_slash(model_dirs: dict[str, Path], tokens: torch.Tensor,
                                                          tmp_path: Path) -> None:
    folder = str(model_dirs["gpt2"])
    res = analyze(folder + "/", data=tokens, metrics=["basic.loss"], config=CFG)
    assert res.models == [Path(folder).name]  # the short name; the path stays in the record
    assert res.record.models[0].source == folder
    want = res.get("basic.loss").value("loss")
    assert res.get("basic.loss", model=folder).value("loss") == want
    assert res.get("basic.loss", model=folder + "/").value("loss") == want
    plain = analyze(folder, data=tokens, metrics=["basic.loss"], config=CFG)
    assert plain.get("basic.loss", model=folder + "/").value("loss") == want
    loaded = check_roundtrip(plain, tmp_path / "out")
    assert loaded.get("basic.loss", model=folder + "/").value("loss") == want
    with pytest.raises(KeyError, match="no model"):
        res.get("basic.loss", model=folder + "x")
    with pytest.raises(KeyError, match="basic.loss"):
        res.get("basic.los", model=folder)


def test_loading_something_else_is_a_results_format_error(tmp_path: Path, model_dirs: dict[str, Path],
                                                          tokens: torch.Tensor) -> None:
    with pytest.raises(ResultsFormatError, match="does not exist"):
        Results.load(tmp_path)
    res = analyze(str(model_dirs["gpt2"]), metrics=["basic.weight_norms"], config=CFG)
    res.save(tmp_path)
    raw = json.loads((tmp_path / "results.json").read_text())
    raw["schema_version"] = "99.0"
    (tmp_path / "results.json").write_text(json.dumps(raw))
    with pytest.raises(ResultsFormatError, match="99.0"):
        Results.load(tmp_path)


def test_run_record_describes_the_run(model_dirs: dict[str, Path], tokens: torch.Tensor) -> None:
    res = analyze(str(model_dirs["llama"]), data=tokens, metrics=list(BASIC), config=CFG)
    record, model = res.record, res.model()
    assert record.config["seed"] == 0 and record.config["batch_size"] == 4 and record.dtype == "float32"
    assert {p.name for p in record.plugins} >= {"tensorscope-core", "tensorscope-basic"}
    assert model.family == "llama" and model.n_sequences == 12 and model.n_tokens == 120
    assert model.dims["n_kv_heads"] == 2 and model.dims["n_layers"] == 2
    assert list(model.metrics) == sorted(BASIC)
    weight = res.get("basic.weight_norms")
    assert weight.plugin == "tensorscope-basic" and weight.version == "1"
    assert math.isclose(weight.value("total_norm") ** 2,
                        sum(v ** 2 for v in weight.value("layer_norm")) + weight.value("outside_norm") ** 2)
    csv_rows = list(csv.DictReader(io.StringIO(res.to_csv())))
    assert {r["metric"] for r in csv_rows} == set(BASIC)
