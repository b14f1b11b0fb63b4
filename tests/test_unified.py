"""Familiar entry points and options: UnifiedModelAnalyzer / UnifiedConfig (family flags, flat names),
family patterns (``fisher.*``), deterministic runs, device/dtype "auto", force_recompute."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import tensorscope_core as ts
from tensorscope_core.errors import BadParameterError, UnknownMetricError
from tensorscope_core.models.load import ModelSource
from tensorscope_core.run_settings import CUBLAS_WORKSPACE, resolve_auto
from tensorscope_core.scheduler.graph import resolve
from tensorscope_core.testing import random_token_data, temporary_plugin, tiny_model
from tensorscope_core.unified import UnifiedResults, flat_names

BASIC = ["basic.activation_stats", "basic.grad_norms", "basic.loss", "basic.weight_norms"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model("gpt2", tmp_path_factory.mktemp("m") / "gpt2", with_tokenizer=False)


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return random_token_data(64, n=4, length=8)


class Probe(ts.Metric):
    """Records the process state a metric sees while the run lasts, and counts its computations."""

    name = "t.probe"
    artifacts = ("weights",)
    calls = 0

    def finalize(self) -> dict[str, float]:
        type(self).calls += 1
        return {"deterministic": float(torch.are_deterministic_algorithms_enabled()),
                "cublas": float(os.environ.get("CUBLAS_WORKSPACE_CONFIG") == CUBLAS_WORKSPACE),
                "calls": float(type(self).calls)}


# -- family flags and flat names ------------------------------------------------------------
def test_family_flags_come_from_the_registry_and_select_family_patterns() -> None:
    with temporary_plugin("t", metrics=[Probe], only_installed=["basic"]):
        assert ts.UnifiedConfig(compute_t=True).metric_selection() == ["t.*"]
        assert ts.UnifiedConfig(compute_basic=True, compute_t=True).metric_selection() == "all"
        assert ts.UnifiedConfig(compute_basic=False).metric_selection() == ["t.*"]
        assert ts.UnifiedConfig(seed=2).metric_selection() == "all"
        with pytest.raises(BadParameterError, match="did you mean 'compute_basic'"):
            ts.UnifiedConfig(compute_basik=True)
        with pytest.raises(BadParameterError, match="every family flag is False"):
            ts.UnifiedConfig(compute_basic=False, compute_t=False).metric_selection()
        with pytest.raises(BadParameterError, match="True or False"):
            ts.UnifiedConfig(compute_t="yes")
        analyzer = ts.UnifiedModelAnalyzer(ts.UnifiedConfig(compute_t=True, seed=4))
        assert analyzer.metrics == ["t.*"]
        assert analyzer.config == ts.RunConfig(seed=4) and type(analyzer.config) is ts.RunConfig


def test_unified_analyzer_runs_the_flagged_family_and_answers_flat_names(
        folder: Path, data: torch.Tensor, basic_only: None) -> None:
    config = ts.UnifiedConfig(compute_basic=True, batch_size=2)
    res = ts.UnifiedModelAnalyzer(config).analyze_models(str(folder), data)
    assert isinstance(res, UnifiedResults)
    assert sorted(res.model().metrics) == BASIC
    assert res.get("basic_loss") is res.get("basic.loss")  # flat and namespaced: the same result
    plain = ts.analyze(str(folder), data, ["basic.loss"], config=ts.RunConfig(batch_size=2))
    assert res.get("basic_loss").value("loss") == plain.get("basic.loss").value("loss")
    with pytest.raises(KeyError, match="did you mean 'basic_loss'"):
        res.get("basic_los")
    with pytest.raises(KeyError, match="did you mean 'basic.loss'"):  # Results.get's behaviour, unchanged
        res.get("basic.los")
    assert "compute_basic" not in res.record.config  # the record holds the plain RunConfig


def test_flat_names_map_every_metric_by_its_dotted_name() -> None:
    with temporary_plugin("t", metrics=[Probe], only_installed=["basic"]) as registry:
        assert flat_names(registry) == {"basic_activation_stats": "basic.activation_stats",
                                        "basic_grad_norms": "basic.grad_norms", "basic_loss": "basic.loss",
                                        "basic_weight_norms": "basic.weight_norms", "t_probe": "t.probe"}


def test_the_docs_table_lists_every_flat_name_of_the_first_party_families() -> None:
    guide = (Path(__file__).parents[1] / "docs" / "user-guide.md").read_text()
    for flat, name in flat_names().items():
        assert f"| `{flat}` | `{name}` |" in guide, flat


# -- family patterns ------------------------------------------------------------------------
def test_a_family_pattern_selects_the_family_and_a_pattern_matching_nothing_is_refused(
        basic_registry: ts.plugins.Registry) -> None:
    nodes = resolve(["basic.*", "basic.loss"], {}, basic_registry)
    assert sorted(n.name for n in nodes) == BASIC
    assert sorted(n.name for n in resolve(["basic.*_norms"], {}, basic_registry)) == ["basic.grad_norms",
                                                                                      "basic.weight_norms"]
    # the Python API takes the CLI's comma-separated form too
    assert sorted(n.name for n in resolve("basic.*_norms, basic.loss", {}, basic_registry)) == BASIC[1:]
    with pytest.raises(UnknownMetricError, match="matches no installed metric: did you mean 'basic.\\*'"):
        resolve(["basik.*"], {}, basic_registry)


def test_the_cli_takes_family_patterns(folder: Path, data: torch.Tensor, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str], basic_only: None) -> None:
    from safetensors.torch import save_file

    from tensorscope_core.cli import main

    save_file({"input_ids": data}, str(tmp_path / "ids.safetensors"))
    assert main(["plan", str(folder), "--data", str(tmp_path / "ids.safetensors"),
                 "--metrics", "basic.*_norms,basic.loss", "--json"]) == 0
    passes = json.loads(capsys.readouterr().out)[0]["passes"]
    assert sorted({m for p in passes for m in p["metrics"]}) == ["basic.grad_norms", "basic.loss",
                                                                 "basic.weight_norms"]
    assert main(["plan", str(folder), "--metrics", "fishr.*", "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"] == "UnknownMetricError"


# -- deterministic --------------------------------------------------------------------------
def test_deterministic_runs_are_bit_identical_and_the_process_state_is_restored(
        folder: Path, data: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    assert not before
    config = ts.RunConfig(deterministic=True, batch_size=2)
    with temporary_plugin("t", metrics=[Probe], only_installed=["basic"]):
        runs = [ts.analyze(str(folder), data, ["basic.grad_norms", "t.probe"], config=config) for _ in range(2)]
    probe = runs[0].get("t.probe")
    assert probe.value("deterministic") == 1.0 and probe.value("cublas") == 1.0  # on while the run lasted
    assert torch.are_deterministic_algorithms_enabled() is False  # ... and off again afterwards
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert runs[0].record.config["deterministic"] is True
    first, second = (r.get("basic.grad_norms").value("layer_norm") for r in runs)
    assert first == second  # bit-identical: exact float equality


def test_deterministic_mode_is_restored_after_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorscope_core.run_settings import deterministic_mode

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with pytest.raises(RuntimeError, match="boom"), deterministic_mode(True):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
        raise RuntimeError("boom")
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert not torch.are_deterministic_algorithms_enabled()


# -- device and dtype "auto" ----------------------------------------------------------------
def test_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    src = [ModelSource(torch.nn.Linear(2, 2))]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_auto(ts.RunConfig(device="auto"), src)[0].device == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_auto(ts.RunConfig(device="auto"), src)[0].device == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    config, notes = resolve_auto(ts.RunConfig(device="auto"), src)
    assert config.device == "cpu" and notes == ["device 'auto': cpu (cuda if available, else mps, else cpu)"]


@pytest.mark.parametrize(("declared", "chosen"), [("float64", "float64"), ("bfloat16", "bfloat16"),
                                                  ("int8", "float32"), (None, "float32")])
def test_dtype_auto_takes_a_float_torch_dtype_from_config_json(tmp_path: Path, declared: str | None,
                                                               chosen: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": declared} if declared else {}))
    config, notes = resolve_auto(ts.RunConfig(dtype="auto"), [ModelSource(str(tmp_path))])
    assert config.dtype == chosen
    assert notes[0].startswith(f"dtype 'auto': {chosen} (")


def test_auto_choices_are_what_the_record_shows(folder: Path, data: torch.Tensor, tmp_path: Path,
                                                basic_only: None) -> None:
    model = tmp_path / "m64"
    model.mkdir()
    for f in folder.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    raw = json.loads((model / "config.json").read_text())
    raw.pop("dtype", None)
    (model / "config.json").write_text(json.dumps({**raw, "torch_dtype": "float64"}))
    res = ts.analyze(str(model), data, ["basic.loss"], config=ts.RunConfig(device="auto", dtype="auto"))
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert (res.record.config["device"], res.record.config["dtype"]) == (expected, "float64")
    assert (res.record.device, res.record.dtype) == (expected, "float64")
    notes = res.model().notes
    assert f"device 'auto': {expected} (cuda if available, else mps, else cpu)" in notes
    assert "dtype 'auto': float64 (the torch_dtype of the first model's config.json)" in notes
    same = ts.analyze(str(model), data, ["basic.loss"], config=ts.RunConfig(device=expected, dtype="float64"))
    assert res.get("basic.loss").value("loss") == same.get("basic.loss").value("loss")


# -- force_recompute ------------------------------------------------------------------------
def test_force_recompute_computes_again_and_rewrites_the_entry(folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    Probe.calls = 0
    with temporary_plugin("t", metrics=[Probe], only_installed=["basic"]):
        first = ts.analyze(str(folder), None, ["t.probe"], config=ts.RunConfig(cache_dir=cache)).get("t.probe")
        (entry,) = cache.glob("*.json")
        written = entry.stat().st_ino, entry.read_text()
        cached = ts.analyze(str(folder), None, ["t.probe"], config=ts.RunConfig(cache_dir=cache)).get("t.probe")
        forced = ts.analyze(str(folder), None, ["t.probe"],
                            config=ts.RunConfig(cache_dir=cache, force_recompute=True)).get("t.probe")
        again = ts.analyze(str(folder), None, ["t.probe"], config=ts.RunConfig(cache_dir=cache)).get("t.probe")
    assert (first.value("calls"), first.from_cache) == (1.0, False)
    assert (cached.value("calls"), cached.from_cache) == (1.0, True)  # served: not computed
    assert (forced.value("calls"), forced.from_cache) == (2.0, False)  # computed again despite the entry
    assert Probe.calls == 2
    assert entry.stat().st_ino != written[0] and entry.read_text() != written[1]  # the entry was rewritten
    assert (again.value("calls"), again.from_cache) == (2.0, True)  # ... with the recomputed value
