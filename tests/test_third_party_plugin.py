"""A plugin distribution built in the test (not in plugins/) adds a metric without touching the core;
broken and incompatible plugins are listed as broken while the others keep working."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tensorscope_core.testing import tiny_model

PYPROJECT = """
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.3.0"

[project.entry-points.tensorscope]
{ep} = "{module}"

[tool.setuptools]
py-modules = ["{module}"]
"""

GOOD = '''
from tensorscope_core.plugin_api import Metric, NoParams, ScalarValue, hookimpl

TENSORSCOPE_PLUGIN_API = 2


class TokenCount(Metric):
    """Number of real tokens the run saw (a count with an obvious known answer)."""

    name = "thirdparty.token_count"
    summary = "real tokens seen"
    artifacts = ("token_loss",)
    fields = {"tokens": "number of unpadded tokens"}

    def setup(self):
        self.count = 0

    def update(self, step):
        self.count += int(step.batch.attention_mask.sum())

    def finalize(self):
        return {"tokens": ScalarValue(value=float(self.count))}


@hookimpl
def register_metrics(register):
    register(TokenCount)
'''

BROKEN = "import a_module_that_does_not_exist\n"
OLD_API = GOOD.replace("TENSORSCOPE_PLUGIN_API = 2", "TENSORSCOPE_PLUGIN_API = 1").replace(
    "thirdparty.token_count", "oldapi.token_count")


def _dist(root: Path, dist: str, module: str, source: str) -> Path:
    folder = root / dist
    folder.mkdir()
    (folder / "pyproject.toml").write_text(PYPROJECT.format(dist=dist, ep=module, module=module))
    (folder / f"{module}.py").write_text(textwrap.dedent(source))
    return folder


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dists")
    folders = [_dist(root, "ts-thirdparty", "ts_thirdparty", GOOD),
               _dist(root, "ts-broken", "ts_broken", BROKEN),
               _dist(root, "ts-oldapi", "ts_oldapi", OLD_API)]
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), *map(str, folders)], check=True)
    return target


def _cli(site: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "TENSORSCOPE_LOAD_PLUGINS"}
    full_env.update({"PYTHONPATH": str(site), **(env or {})})
    return subprocess.run([sys.executable, "-m", "tensorscope_core.cli", *args], capture_output=True, text=True,
                          env=full_env)


def test_plugins_lists_third_party_ok_and_broken_ones_broken(site: Path) -> None:
    proc = _cli(site, "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    plugins = {p["name"]: p for p in json.loads(proc.stdout)}
    assert plugins["ts-thirdparty"]["status"] == "ok"
    assert plugins["ts-thirdparty"]["version"] == "0.3.0"
    assert [m["name"] for m in plugins["ts-thirdparty"]["metrics"]] == ["thirdparty.token_count"]
    assert plugins["ts-broken"]["status"] == "broken"
    assert "a_module_that_does_not_exist" in plugins["ts-broken"]["error"]
    assert plugins["ts-oldapi"]["status"] == "broken"
    assert "plugin API 1" in plugins["ts-oldapi"]["error"]
    assert plugins["tensorscope-basic"]["status"] == "ok"


def test_third_party_metric_runs_beside_first_party_ones(site: Path, tmp_path: Path) -> None:
    model = tiny_model("gpt2", tmp_path / "model", with_tokenizer=False)
    ids = torch.randint(4, 60, (6, 10), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    proc = _cli(site, "analyze", str(model), "--metrics", "thirdparty.token_count,basic.loss", "--data",
                str(tmp_path / "ids.pt"), "--out", str(tmp_path / "out"), "--batch-size", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    metrics = results["models"][0]["metrics"]
    assert metrics["thirdparty.token_count"]["values"]["tokens"]["value"] == 60.0
    assert metrics["basic.loss"]["status"] == "ok"
    assert results["models"][0]["passes"] == {"forward": 2}


def test_load_plugins_env_selects_distributions(site: Path) -> None:
    proc = _cli(site, "plugins", "--json", env={"TENSORSCOPE_LOAD_PLUGINS": "ts-thirdparty"})
    names = {p["name"] for p in json.loads(proc.stdout)}
    assert names == {"tensorscope-core", "ts-thirdparty"}
    proc = _cli(site, "plugins", "--json", env={"TENSORSCOPE_LOAD_PLUGINS": ""})
    assert {p["name"] for p in json.loads(proc.stdout)} == {"tensorscope-core"}
