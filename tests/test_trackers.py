"""Experiment trackers: results exported to TensorBoard, W&B (offline) and MLflow (local file store)
read back with each tracker's own reader; track() from a training loop. No network."""

from __future__ import annotations

import glob
import json
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import tensorscope_core as ts
from tensorscope_core import plugins as ts_plugins
from tensorscope_core.cli import main
from tensorscope_core.errors import BadParameterError, MissingDependencyError, UsageError
from tensorscope_core.results.schema import (
    HeadValue,
    LayerValue,
    MetricResult,
    ModelRecord,
    RunRecord,
    ScalarValue,
    SeriesValue,
    TableValue,
    TextValue,
)
from tensorscope_core.results.table import tall_rows
from tensorscope_core.testing import random_token_data, tiny_model
from tensorscope_core.trackers import step_batches, tag

pytest.importorskip("tensorboard")
EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator

STEPS = (100, 200, 300)
REPORT = "<html><body>tensorscope report</body></html>"


@pytest.fixture(autouse=True)
def _wandb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B keeps settings and caches under the home folder: keep them in the test's folder."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, basic_registry: ts_plugins.Registry) -> tuple[ts.Results,
                                                                                                        Path]:
    """basic.loss of three checkpoints of a tiny GPT-2 (names carry steps 100, 200, 300), saved with a report."""
    root = tmp_path_factory.mktemp("ckpts")
    dirs = [str(tiny_model("gpt2", root / f"ckpt_step_{s}", seed=i, with_tokenizer=False)) for i, s in enumerate(STEPS)]
    results = ts.analyze(dirs, data=random_token_data(64, n=4, length=8), metrics=["basic.loss"],
                         registry=basic_registry)
    folder = results.save(root / "out")
    (folder / "report.html").write_text(REPORT)
    return results, folder


def _expected(results: ts.Results) -> dict[str, list[tuple[int, np.float32]]]:
    """tag -> [(step, value as float32)] from the tall table, by hand."""
    out: dict[str, list[tuple[int, np.float32]]] = {}
    for row in tall_rows(results.record):
        step = int(Path(row["run"]).name.removeprefix("ckpt_step_"))
        out.setdefault(f"{row['metric']}/{row['field']}", []).append((step, np.float32(row["value"])))
    return out


def _read_wandb(run_dir: Path) -> list[Any]:
    """The records of an offline run's .wandb file. wandb 0.31 ships no Python reader (its DataStore moved
    into the Go core), so this unframes the LevelDB-style log (7-byte header; records of crc32, length,
    type in 32 KiB blocks) and decodes each record with wandb's own protobuf schema."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = Path(path).read_bytes()
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc
        pos, pending = pos + 7 + length, pending + chunk
        if kind in (1, 4):  # full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for record in _read_wandb(run_dir):
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):  # _step, _runtime, _timestamp are W&B's own
                    out.setdefault(key, []).append((record.history.step.num, json.loads(item.value_json)))
    return out


def test_three_checkpoints_read_back_from_tensorboard(checkpoints: tuple[ts.Results, Path], tmp_path: Path) -> None:
    results, folder = checkpoints
    summary = results.export(tensorboard=tmp_path / "tb", report=folder / "report.html")
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    read = {t: [(e.step, np.float32(e.value)) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    assert read == _expected(results)
    assert sum(len(v) for v in read.values()) == len(tall_rows(results.record)) == summary.scalars == 6
    assert summary.steps == list(STEPS)
    assert (tmp_path / "tb" / "report.html").read_text() == REPORT  # TensorBoard has no artifacts: a copy


def test_three_checkpoints_read_back_from_wandb_offline(checkpoints: tuple[ts.Results, Path], tmp_path: Path) -> None:
    pytest.importorskip("wandb")
    results, folder = checkpoints
    results.export(wandb_dir=tmp_path / "wb", report=folder / "report.html")
    assert _read_wandb(tmp_path / "wb")[-1].WhichOneof("record_type") == "exit"  # complete when export returns
    read = {k: [(s, np.float32(v)) for s, v in pairs] for k, pairs in _wandb_history(tmp_path / "wb").items()}
    assert read == _expected(results)
    assert sum(len(v) for v in read.values()) == len(tall_rows(results.record))
    (saved,) = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "files" / "report.html"))
    assert Path(saved).read_text() == REPORT


def test_three_checkpoints_read_back_from_mlflow(checkpoints: tuple[ts.Results, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    tracking = pytest.importorskip("mlflow.tracking")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # naming a folder opts into the file store
    results, folder = checkpoints
    uri = (tmp_path / "mlruns").as_uri()
    results.export(mlflow_uri=uri, report=folder / "report.html", name="ckpts")
    client = tracking.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tensorscope").experiment_id])
    assert run.info.run_name == "ckpts" and run.info.status == "FINISHED"
    read = {k: [(m.step, np.float32(m.value)) for m in sorted(client.get_metric_history(run.info.run_id, k),
                                                               key=lambda m: m.step)]
            for k in run.data.metrics}
    assert read == _expected(results)
    assert sum(len(v) for v in read.values()) == len(tall_rows(results.record))
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["report.html"]


def _record() -> RunRecord:
    """One model with every value kind; known tags below."""
    values = {"s": ScalarValue(value=1.5), "loss/task a": ScalarValue(value=None),
              "per_layer": LayerValue(values=[0.25, 0.5]), "grid": HeadValue(values=[[1.0, 2.0]]),
              "spectrum": SeriesValue(values=[3.0]), "tab": TableValue(columns=["head", "category"],
                                                                        rows=[[0, "critical"], [1, "moderate"]]),
              "note": TextValue(text="hello")}
    result = MetricResult(metric="fam.m", version="1", plugin="p", status="ok", values=values)
    model = ModelRecord(name="runs/checkpoint-500", family="gpt2", fingerprint="f", dims={}, metrics={"fam.m": result})
    return RunRecord(tensorscope_version="2", config={}, device="cpu", dtype="float32", models=[model])


def test_every_value_kind_maps_to_its_tag_at_the_checkpoint_step() -> None:
    ((step, batch),) = step_batches(_record())
    assert step == 500
    assert {k: v for k, v in batch.scalars.items() if k != "fam.m/loss:task a"} == {
        "fam.m/s": 1.5, "fam.m/per_layer/L0": 0.25, "fam.m/per_layer/L1": 0.5, "fam.m/grid/L0/H0": 1.0,
        "fam.m/grid/L0/H1": 2.0, "fam.m/spectrum/I0": 3.0}
    assert np.isnan(batch.scalars["fam.m/loss:task a"])  # null (NaN) is logged, so counts match the table
    assert batch.tables["fam.m/tab"].markdown() == ("| head | category |\n| --- | --- |\n"
                                                    "| 0 | critical |\n| 1 | moderate |")
    assert batch.texts == {"fam.m/note": "hello"}
    assert tag("a.b", "x(y)/z", layer="embed") == "a.b/x_y_:z/Lembed"


def test_models_sharing_a_step_get_their_name_before_each_tag() -> None:
    record = _record()
    other = record.models[0].model_copy(update={"name": "other/checkpoint-500"})
    record.models.append(other)
    ((_, batch),) = step_batches(record)  # same step, same last part: the whole names, "/" made ":"
    assert {"runs:checkpoint-500/fam.m/s", "other:checkpoint-500/fam.m/s"} <= set(batch.scalars)
    other.name = "other/step-500"  # same step, own last parts
    ((_, batch),) = step_batches(record)
    assert {"checkpoint-500/fam.m/s", "step-500/fam.m/s"} <= set(batch.scalars)
    other.name = "llama"  # no step (0): each model has its own step, so no prefix
    assert {s: b.scalars["fam.m/s"] for s, b in step_batches(record)} == {0: 1.5, 500: 1.5}


def test_tables_and_texts_reach_tensorboard_as_text(tmp_path: Path) -> None:
    summary = ts.Results(_record()).export(tensorboard=tmp_path)
    acc = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    acc.Reload()
    text = {t: acc.Tensors(t)[0] for t in acc.Tags()["tensors"]}
    assert text["fam.m/note/text_summary"].tensor_proto.string_val == [b"hello"]
    assert b"| 1 | moderate |" in text["fam.m/tab/text_summary"].tensor_proto.string_val[0]
    assert text["fam.m/note/text_summary"].step == 500
    assert (summary.scalars, summary.tables, summary.texts) == (7, 1, 1)


def test_tables_and_texts_reach_mlflow_as_artifacts(tmp_path: Path) -> None:
    tracking = pytest.importorskip("mlflow.tracking")
    uri = (tmp_path / "mlruns").as_uri()
    ts.Results(_record()).export(mlflow_uri=uri)
    client = tracking.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tensorscope").experiment_id])
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "tables/step_500/fam.m/tab.json",
                                                      str(tmp_path / "dl"))).read_text())
    assert table["columns"] == ["head", "category"] and table["data"] == [[0, "critical"], [1, "moderate"]]
    text = client.download_artifacts(run.info.run_id, "text/step_500/fam.m/note.txt", str(tmp_path / "dl"))
    assert Path(text).read_text() == "hello"


def test_cli_export_attaches_the_report_beside_the_results(checkpoints: tuple[ts.Results, Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _, folder = checkpoints
    assert main(["export", str(folder / "results.json"), "--tensorboard", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["scalars"], out["steps"], out["report"]) == (6, list(STEPS), str(folder / "report.html"))
    assert main(["export", str(folder), "--json"]) == 2  # no tracker named
    assert json.loads(capsys.readouterr().out)["error"] == "UsageError"
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert main(["export", str(folder), "--wandb-offline", str(tmp_path / "wb"), "--json"]) == 1
    error = json.loads(capsys.readouterr().out)
    assert (error["error"], error["fix"]) == ("MissingDependencyError", "pip install 'tensorscope[wandb]'")


@pytest.mark.parametrize(("kwarg", "module", "extra"), [("tensorboard", "torch.utils.tensorboard", "tensorboard"),
                                                        ("wandb_dir", "wandb", "wandb"),
                                                        ("mlflow_uri", "mlflow.tracking", "mlflow")])
def test_a_missing_tracker_package_names_its_extra(kwarg: str, module: str, extra: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import of it raises ImportError
    with pytest.raises(MissingDependencyError) as err:
        ts.Results(_record()).export(**{kwarg: str(tmp_path / "t")})
    assert f"tensorscope[{extra}]" in err.value.fix


def test_a_missing_report_or_no_tracker_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no tracker"):
        ts.Results(_record()).export()
    with pytest.raises(UsageError, match="does not exist"):
        ts.Results(_record()).export(tensorboard=tmp_path, report=tmp_path / "nope.html")


def _state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None], list[bool]]:
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
            [m.training for m in model.modules()])


@pytest.mark.usefixtures("basic_only")
def test_track_logs_what_analyze_gives_and_leaves_training_as_it_was(tmp_path: Path) -> None:
    import transformers as tf
    from torch.utils.tensorboard import SummaryWriter

    from tensorscope_core.testing import tiny_config

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_config("gpt2", 64))
    data = random_token_data(64, n=4, length=8)
    model.train()
    model.transformer.h[0].eval()  # a frozen block: per-module modes must survive too
    model(input_ids=data, labels=data).loss.backward()
    before = _state(model)
    writer = SummaryWriter(str(tmp_path))
    tracker = ts.track(model, every=10, metrics=["basic.loss"], writer=writer, data=data)
    rng = torch.get_rng_state()
    assert tracker.step(15) is None
    tracked = tracker.step(20)
    after = _state(model)
    assert torch.equal(torch.get_rng_state(), rng)  # the training loop's random stream goes on unchanged
    assert all(torch.equal(before[0][n], after[0][n]) for n in before[0])
    assert all(torch.equal(before[1][n], after[1][n]) for n in before[1])  # type: ignore[arg-type]
    assert before[2] == after[2]
    writer.close()
    expected = ts.analyze({"model": model}, data=data, metrics=["basic.loss"]).get("basic.loss").values
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    events = acc.Scalars("basic.loss/loss")
    assert [(e.step, np.float32(e.value)) for e in events] == [(20, np.float32(expected["loss"].value))]
    assert tracked is not None and tracked.get("basic.loss").values["loss"].value == expected["loss"].value
    assert set(acc.Tags()["scalars"]) == {"basic.loss/loss", "basic.loss/perplexity"}


def test_track_refuses_a_step_interval_below_one() -> None:
    with pytest.raises(BadParameterError, match="every=0"):
        ts.track(torch.nn.Linear(2, 2), every=0, metrics=["basic.loss"], writer=object())
