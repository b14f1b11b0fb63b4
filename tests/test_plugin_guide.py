"""A third-party plugin built from the guide alone.

docs/plugin-author-guide.md marks the files of its tutorial plugin with an HTML comment,
``<!-- guide-file: probes/PATH -->``, on the line before the code block (other comments, such
as the ``file:``/``generated:`` markers tests/test_docs.py reads, may stand between the two).
Nothing else goes into the distribution: no ``tensorscope new-plugin`` skeleton, no file of
this repository. The blocks are written to a temporary folder (the last block of a path wins,
as the tutorial grows ``plugin.py``), installed with pip into a folder of their own and run
through the ``tensorscope`` command in a subprocess, as a user who followed the guide would.
The assertions are on that plugin and the core only (first-party plugins are not needed).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tensorscope_core.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugin-author-guide.md"
GUIDE_FILE = re.compile(
    r"^<!-- guide-file: (?P<path>\S+) -->\n(?:<!-- [^\n]* -->\n)*```[a-z]*\n(?P<body>.*?)\n```$", re.M | re.S)
PACKAGE = "src/tensorscope_probes"
EXPECTED = {"pyproject.toml", "README.md", *(f"{PACKAGE}/{m}.py" for m in (
    "__init__", "plugin", "metrics", "entropy", "gap", "artifacts", "attention", "trend"))}
METRICS = {"probes.embedding_row_norm": "model", "probes.next_token_entropy": "model",
           "probes.entropy_gap": "model", "probes.attn_out_norm": "model", "probes.entropy_change": "model_set"}
#: the data of the known answer the guide states: 6 unpadded sequences of 10 token ids
N_SEQUENCES, LENGTH = 6, 10
#: the vocabulary of tensorscope_core.testing.tiny_model(..., with_tokenizer=False)
VOCAB = 64

needs_setuptools = pytest.mark.skipif(importlib.util.find_spec("setuptools") is None,
                                      reason="pip install --no-build-isolation needs setuptools here")


def guide_files() -> dict[str, str]:
    """{path under probes/: content} of the blocks the guide marks as the plugin's files."""
    files: dict[str, str] = {}
    for match in GUIDE_FILE.finditer(GUIDE.read_text()):
        path = match["path"]
        assert path.startswith("probes/"), f"guide-file {path} is outside the plugin folder probes/"
        files[path.removeprefix("probes/")] = match["body"] + "\n"
    return files


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the plugin's folder, the site folder it is installed into)."""
    root = tmp_path_factory.mktemp("guide-plugin")
    folder = root / "probes"
    for rel, body in guide_files().items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(body)
    site = root / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--target", str(site), str(folder)], capture_output=True, text=True)
    assert install.returncode == 0, install.stdout[-4000:] + install.stderr[-4000:]
    return folder, site


def _env(site: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TENSORSCOPE_LOAD_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra})
    return env


def _cli(site: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tensorscope_core.cli", *args], capture_output=True, text=True,
                          env=_env(site, **env))


def test_the_guide_marks_every_file_of_the_distribution_and_imports_only_the_plugin_api() -> None:
    files = guide_files()
    assert set(files) == EXPECTED
    assert 'probes = "tensorscope_probes.plugin"' in files["pyproject.toml"]
    assert "TENSORSCOPE_PLUGIN_API = 2\n" in files[f"{PACKAGE}/plugin.py"]
    for path, body in files.items():
        if path.endswith(".py"):
            compile(body, path, "exec")
            core_imports = re.findall(r"^\s*(?:from|import) (tensorscope_core\S*)", body, re.M)
            assert set(core_imports) <= {"tensorscope_core.plugin_api"}, (path, core_imports)
    # the guide states the known answer the CLI test below checks
    assert "**54 for 6 sequences of 10 ids**" in GUIDE.read_text()


@needs_setuptools
def test_the_installed_plugin_loads_ok_beside_the_core(built: tuple[Path, Path]) -> None:
    """Found through its installed entry point; loaded alone with the core (selected by its
    entry-point name, as a user would), so first-party plugins play no part."""
    _, site = built
    proc = _cli(site, "plugins", "--json", TENSORSCOPE_LOAD_PLUGINS="probes")
    assert proc.returncode == 0, proc.stderr[-4000:]
    plugins = {p["name"]: p for p in json.loads(proc.stdout)}
    assert set(plugins) == {"tensorscope-core", "tensorscope-probes"}
    assert plugins["tensorscope-core"]["status"] == "ok"
    probes = plugins["tensorscope-probes"]
    assert probes["status"] == "ok", probes["error"]
    assert probes["version"] == "0.1.0"
    assert {m["name"]: m["scope"] for m in probes["metrics"]} == METRICS
    assert {m["name"]: m["artifacts"] for m in probes["metrics"]}["probes.attn_out_norm"] == ["probes.attn_out"]


@needs_setuptools
def test_the_guide_metric_gives_its_known_answer_through_the_cli(built: tuple[Path, Path], tmp_path: Path) -> None:
    """The guide's known answer: 6 unpadded sequences of 10 ids have 6 * 9 = 54 scored positions."""
    _, site = built
    first = tiny_model("gpt2", tmp_path / "step-100", seed=0, with_tokenizer=False)
    last = tiny_model("gpt2", tmp_path / "step-500", seed=1, with_tokenizer=False)
    ids = torch.randint(4, VOCAB, (N_SEQUENCES, LENGTH), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    out = tmp_path / "out"
    proc = _cli(site, "analyze", f"step-100={first}", f"step-500={last}", "--data", str(tmp_path / "ids.pt"),
                "--metrics", "probes.next_token_entropy,probes.attn_out_norm,probes.entropy_change",
                "--batch-size", "4", "--out", str(out), "--no-cache", "--json",
                TENSORSCOPE_LOAD_PLUGINS="probes")
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)["results"]
    assert {(s["model"], s["metric"]): s["status"] for s in summary} == {
        **{(m, metric): "ok" for m in ("step-100", "step-500")
           for metric in ("probes.next_token_entropy", "probes.attn_out_norm")},
        ("*", "probes.entropy_change"): "ok"}

    record = json.loads((out / "results.json").read_text())
    assert [p["name"] for p in record["plugins"]] == ["tensorscope-core", "tensorscope-probes"]
    entropies = []
    for model in record["models"]:
        assert model["passes"] == {"forward": 2}  # 2 batches of 4, one shared forward each for both metrics
        entropy = model["metrics"]["probes.next_token_entropy"]
        assert entropy["values"]["positions"]["value"] == N_SEQUENCES * (LENGTH - 1) == 54
        assert entropy["values"]["entropy"]["n"] == 54
        assert 0.0 < entropy["values"]["entropy"]["value"] <= math.log(VOCAB)
        assert entropy["values"]["by_position"]["shape"] == [LENGTH - 1]
        assert (entropy["plugin"], entropy["version"], entropy["class_path"]) == (
            "tensorscope-probes", "1", "tensorscope_probes.entropy:NextTokenEntropy")
        norm = model["metrics"]["probes.attn_out_norm"]["values"]["norm"]
        assert norm["axis"] == "block" and len(norm["values"]) == 2  # tiny models have 2 blocks
        entropies.append(entropy["values"]["entropy"]["value"])

    change = record["model_set"]["probes.entropy_change"]
    assert change["class_path"] == "tensorscope_probes.trend:EntropyChange"
    assert change["derived_from"] == ["probes.next_token_entropy"]
    assert change["values"]["change"]["value"] == pytest.approx(entropies[1] - entropies[0], abs=1e-12)
    assert change["values"]["per_model"]["values"] == pytest.approx(entropies, abs=1e-12)


@needs_setuptools
@pytest.mark.skipif(importlib.util.find_spec("importlinter") is None, reason="import-linter is not installed")
def test_the_import_contract_the_guide_gives_holds_and_catches_an_internal_import(
        built: tuple[Path, Path], tmp_path: Path) -> None:
    folder, site = built
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    kept = subprocess.run([exe, "--no-cache"], cwd=folder, env=_env(site), capture_output=True, text=True)
    assert kept.returncode == 0, kept.stdout[-4000:] + kept.stderr[-2000:]
    assert "1 kept, 0 broken" in kept.stdout

    bad = tmp_path / "bad"
    shutil.copytree(folder / PACKAGE, bad / "tensorscope_probes")
    (bad / "tensorscope_probes" / "internal.py").write_text("from tensorscope_core.metric import Metric\n")
    broken = subprocess.run([exe, "--no-cache"], cwd=folder, env=_env(bad), capture_output=True, text=True)
    assert broken.returncode != 0
    assert "tensorscope_probes.internal -> tensorscope_core.metric" in broken.stdout, broken.stdout[-4000:]
