"""The installed distribution is ours (not the unrelated 'tensorscope' 1.x on PyPI), extras name
the first-party plugins, and `tensorscope new-plugin` writes a plugin that passes its own test."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib

from tensorscope_core.errors import UsageError
from tensorscope_core.scaffold import write_plugin

ROOT = Path(__file__).resolve().parents[1]


def test_installed_tensorscope_is_this_project() -> None:
    dist = metadata.distribution("tensorscope")
    assert dist.version.split(".")[0] == "2"
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts["tensorscope"] == "tensorscope_core.cli:main"
    import tensorscope_core

    assert tensorscope_core.__version__ == dist.version


def test_extras_name_every_first_party_plugin_at_our_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    plugins = sorted(p.name for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").exists())
    extras = project["optional-dependencies"]
    (all_spec,) = extras["all"]
    in_all = set(all_spec.removeprefix("tensorscope[").removesuffix("]").split(","))
    for plugin in plugins:
        family = plugin.removeprefix("tensorscope-")
        meta = tomllib.loads((ROOT / "plugins" / plugin / "pyproject.toml").read_text())["project"]
        assert extras[family] == [f"{plugin}=={meta['version']}"]
        # the core, with the first-party families it reads metrics of (e.g. tensorscope[basic,geometry]>=2)
        assert any(re.match(r"tensorscope(\[[a-z,]+\])?>=2", dep) for dep in meta["dependencies"])
        assert family in in_all
        assert (ROOT / "plugins" / plugin / "CHANGELOG.md").exists()
        assert (ROOT / "plugins" / plugin / "README.md").exists()


def test_new_plugin_skeleton_installs_and_passes_its_own_test(tmp_path: Path) -> None:
    folder = write_plugin("probes", tmp_path)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(folder)], check=True)
    env = {k: v for k, v in os.environ.items() if k != "TENSORSCOPE_LOAD_PLUGINS"}
    env["PYTHONPATH"] = str(site)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder / "tests")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout


def test_new_plugin_refuses_bad_names_and_existing_folders(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a lowercase identifier"):
        write_plugin("Bad-Name", tmp_path)
    write_plugin("probes", tmp_path)
    with pytest.raises(UsageError, match="already exists"):
        write_plugin("probes", tmp_path)


def test_requirements_install_every_first_party_plugin() -> None:
    listed = {line.split()[-1] for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.startswith("-e plugins/")}
    folders = {f"plugins/{p.name}" for p in (ROOT / "plugins").iterdir() if (p / "pyproject.toml").exists()}
    assert listed == folders
