"""The public plugin API: one module, versioned, and the only route from a plugin into the core.

The import-linter contract in pyproject.toml (``[tool.importlinter]``) is run here, so CI fails
when a first-party plugin imports a core module other than ``tensorscope_core.plugin_api``; a
second check keeps the contract's list of forbidden modules complete as the core grows.
"""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tensorscope_core
from tensorscope_core import plugin_api
from tensorscope_core.hookspecs import PLUGIN_API_VERSION
from tensorscope_core.plugin_api import Metric, ModelSetMetric, NoParams, ScalarValue
from tensorscope_core.testing import temporary_plugin

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]
PUBLIC_FOR_PLUGINS = {"plugin_api"}


def _contract() -> dict:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["id"] == "plugin-api"]
    return contract


def test_the_contract_forbids_every_core_module_but_the_plugin_api() -> None:
    contract = _contract()
    modules = {m.name for m in pkgutil.iter_modules(tensorscope_core.__path__)}
    forbidden = {m.removeprefix("tensorscope_core.") for m in contract["forbidden_modules"]}
    assert "tensorscope_core" in contract["forbidden_modules"]  # the top-level package too
    assert forbidden - {"tensorscope_core"} == modules - PUBLIC_FOR_PLUGINS
    first_party = {p.name.replace("-", "_") for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").exists()}
    assert set(contract["source_modules"]) == first_party


def test_first_party_plugins_import_the_core_only_through_the_plugin_api() -> None:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    proc = subprocess.run([exe, "--no-cache", "--contract", "plugin-api"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_every_exported_name_exists_and_the_version_is_current() -> None:
    missing = [name for name in plugin_api.__all__ if not hasattr(plugin_api, name)]
    assert not missing
    assert plugin_api.PLUGIN_API_VERSION == PLUGIN_API_VERSION == 2


def test_a_per_model_metric_that_claims_model_set_scope_is_refused_with_the_fix() -> None:
    class Wrong(Metric):
        name = "t.wrong"
        scope = "model_set"  # type: ignore[assignment]

    with temporary_plugin("t-wrong", metrics=[Wrong], only_installed=[]) as registry:
        (record,) = [p for p in registry.plugins if p.name == "t-wrong"]
    assert record.status == "broken" and "ModelSetMetric" in (record.error or "")


class _Slow(ModelSetMetric):
    name = "t.slow_set"
    Params = NoParams

    def compute_set(self, views, results):
        import time

        time.sleep(3)
        return {"n": ScalarValue(value=float(len(views)))}


class _Fails(ModelSetMetric):
    name = "t.failing_set"
    Params = NoParams

    def compute_set(self, views, results):
        raise ValueError("planted failure")


class _Holds(ModelSetMetric):
    """Holds a list of tensors as state: the measured bytes count what the container holds."""

    name = "t.holds_set"
    Params = NoParams

    @classmethod
    def cost(cls, params, view, shape):
        from tensorscope_core.plugin_api import Cost

        return Cost(state_bytes=3 * 1000 * 8)

    def compute_set(self, views, results):
        import torch

        self.kept = [torch.zeros(1000, dtype=torch.float64) for _ in range(3)]
        return {"n": ScalarValue(value=float(len(views)))}


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    from tensorscope_core.testing import tiny_model

    root = tmp_path_factory.mktemp("pair")
    return {"a": str(tiny_model("gpt2", root / "a", with_tokenizer=False)),
            "b": str(tiny_model("gpt2", root / "b", seed=1, with_tokenizer=False))}


def test_model_set_metrics_run_under_the_same_time_limit_and_fail_fast(two_models: dict[str, str]) -> None:
    from tensorscope_core import RunConfig, analyze
    from tensorscope_core.scheduler.run import MetricFailed

    with temporary_plugin("t-set", metrics=[_Slow, _Fails, _Holds], only_installed=[]) as registry:
        res = analyze(two_models, None, ["t.slow_set", "t.failing_set", "t.holds_set"],
                      config=RunConfig(metric_timeout_s=0.5), registry=registry)
        slow = res.record.model_set["t.slow_set"]
        assert slow.status == "error" and slow.error_type == "MetricTimeoutError", slow
        failed = res.record.model_set["t.failing_set"]
        assert failed.status == "error" and "planted failure" in (failed.reason or "")
        held = res.record.model_set["t.holds_set"]
        assert held.ok and held.declared_bytes == held.measured_bytes == 24_000
        assert held.class_path == f"{__name__}:_Holds"
        with pytest.raises(MetricFailed, match="t.failing_set failed on the model set"):
            analyze(two_models, None, ["t.failing_set"], config=RunConfig(fail_fast=True), registry=registry)


def test_model_set_results_come_from_the_cache_on_a_second_run(two_models: dict[str, str], tmp_path: Path) -> None:
    from tensorscope_core import RunConfig, analyze

    with temporary_plugin("t-set", metrics=[_Holds], only_installed=[]) as registry:
        config = RunConfig(cache_dir=tmp_path / "cache")
        first = analyze(two_models, None, ["t.holds_set"], config=config, registry=registry)
        second = analyze(two_models, None, ["t.holds_set"], config=config, registry=registry)
    assert not first.record.model_set["t.holds_set"].from_cache
    assert second.record.model_set["t.holds_set"].from_cache
    assert second.record.model_set["t.holds_set"].values == first.record.model_set["t.holds_set"].values


def test_the_plan_shows_the_model_set_stage_with_every_members_weights(two_models: dict[str, str]) -> None:
    from tensorscope_core import plan

    with temporary_plugin("t-set", metrics=[_Holds], only_installed=[]) as registry:
        plans = plan(two_models, None, ["t.holds_set"], registry=registry)
    *members, stage = plans
    assert stage.model == "model set" and stage.metrics == ["t.holds_set"]
    assert stage.weights_bytes == sum(p.weights_bytes for p in members)
    assert stage.peak_bytes >= stage.weights_bytes + 24_000
    assert "members' weights kept" in stage.render()


class _ResultsOnly(ModelSetMetric):
    """Reads the members' names and configs only: their weights need not stay loaded."""

    name = "t.results_only"
    Params = NoParams
    reads_weights = False

    def compute_set(self, views, results):
        devices = {str(next(v.model.parameters()).device) for v in views.values()}
        return {"n": ScalarValue(value=float(len(views))), "on_meta": ScalarValue(value=float(devices == {"meta"}))}


class _ReadsWeights(ModelSetMetric):
    name = "t.reads_weights"
    Params = NoParams

    def compute_set(self, views, results):
        total = sum(float(p.detach().double().abs().sum()) for v in views.values() for p in v.model.parameters())
        return {"abs_sum": ScalarValue(value=total)}


def test_weights_stay_loaded_only_for_model_set_metrics_that_read_them(two_models: dict[str, str]) -> None:
    from tensorscope_core import analyze, plan

    with temporary_plugin("t-set", metrics=[_ResultsOnly, _ReadsWeights], only_installed=[]) as registry:
        *members, alone = plan(two_models, None, ["t.results_only"], registry=registry)
        *_, both = plan(two_models, None, ["t.results_only", "t.reads_weights"], registry=registry)
        released = analyze(two_models, None, ["t.results_only"], registry=registry)
        kept = analyze(two_models, None, ["t.results_only", "t.reads_weights"], registry=registry)
    assert alone.weights_bytes == 0 and both.weights_bytes == sum(p.weights_bytes for p in members) > 0
    assert released.record.model_set["t.results_only"].values["on_meta"].value == 1.0
    assert kept.record.model_set["t.results_only"].values["on_meta"].value == 0.0
    assert kept.record.model_set["t.reads_weights"].values["abs_sum"].value > 0
