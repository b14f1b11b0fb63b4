"""The documentation matches the code.

- docs/metrics.md is the catalogue generated from the first-party plugins' metric specs;
- docs/result-schema.json is the JSON Schema generated from the result models, and
  docs/report-schema.json the one of the report JSON (ReportRecord);
- every plugin hook is documented in the author guide with its exact signature (datasette style);
- every CLI command and flag, every RunConfig field and every error type is in the user guide;
- the author guide's tutorial plugin is real: generated with `tensorscope new-plugin`, filled
  with the guide's files, installed and tested; the user guide's Python examples run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pluggy
import pytest

from tensorscope_core import errors, hookspecs
from tensorscope_core import plugins as ts_plugins
from tensorscope_core.catalogue import catalogue_markdown
from tensorscope_core.cli import build_parser
from tensorscope_core.config import RunConfig
from tensorscope_core.core_artifacts import CORE_ARTIFACTS
from tensorscope_core.results.export_schema import report_schema_text, schema_text

DOCS = Path(__file__).resolve().parent.parent / "docs"
USER_GUIDE = DOCS / "user-guide.md"
AUTHOR_GUIDE = DOCS / "plugin-author-guide.md"
#: every first-party plugin distribution of this checkout (the catalogue documents all of them)
FIRST_PARTY = ",".join(sorted(p.parent.name for p in (DOCS.parent / "plugins").glob("*/pyproject.toml")))
REGENERATE = (f"regenerate it: TENSORSCOPE_LOAD_PLUGINS={FIRST_PARTY} python -m tensorscope_core.catalogue "
              "docs/metrics.md; python -m tensorscope_core.results.export_schema docs/result-schema.json; "
              "python -m tensorscope_core.results.export_schema --report docs/report-schema.json")

#: An HTML comment naming a file of the tutorial plugin, right before the fenced block holding it.
FILE_BLOCK = re.compile(r"<!-- file: (?P<path>[^ ]+) -->\n```[a-z]*\n(?P<body>.*?)\n```\n", re.S)
#: The same for excerpts of what `new-plugin` writes: each of their lines is in the generated file.
GENERATED_BLOCK = re.compile(r"<!-- generated: (?P<path>[^ ]+) -->\n```[a-z]*\n(?P<body>.*?)\n```\n", re.S)


def tutorial_files(text: str) -> dict[str, str]:
    """{path inside the plugin folder: content}; a file shown twice keeps its last version."""
    files: dict[str, str] = {}
    for match in FILE_BLOCK.finditer(text):
        files[match["path"]] = match["body"] + "\n"
    return files


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# -- generated files --------------------------------------------------------------------------
def test_metric_catalogue_is_current(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ts_plugins.LOAD_ENV, FIRST_PARTY)
    registry = ts_plugins.build_registry()
    broken = [p for p in registry.plugins if p.status != "ok"]
    assert not broken, broken
    assert (DOCS / "metrics.md").read_text() == catalogue_markdown(registry), REGENERATE


def test_result_schema_is_current() -> None:
    assert (DOCS / "result-schema.json").read_text() == schema_text(), REGENERATE


def test_report_schema_is_current() -> None:
    assert (DOCS / "report-schema.json").read_text() == report_schema_text(), REGENERATE


# -- the author guide -------------------------------------------------------------------------
def test_every_hook_is_documented_with_its_signature() -> None:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    hooks = {name: caller for name, caller in vars(pm.hook).items() if not name.startswith("_")}
    assert hooks, "no hook specifications found"
    text = AUTHOR_GUIDE.read_text()
    for name, caller in hooks.items():
        assert caller.spec is not None
        signature = f"{name}({', '.join(caller.spec.argnames)})"
        heading = re.compile(rf"^#+ .*{re.escape(signature)}", re.M)
        assert heading.search(text), f"{AUTHOR_GUIDE.name} has no heading with {signature}"


def test_every_core_artifact_is_documented() -> None:
    text = AUTHOR_GUIDE.read_text()
    for spec in CORE_ARTIFACTS:
        assert f"| `{spec.name}` | {spec.pass_kind} |" in text, spec.name


def test_plugin_api_version_in_the_guide_is_current() -> None:
    text = AUTHOR_GUIDE.read_text()
    assert f"TENSORSCOPE_PLUGIN_API = {hookspecs.PLUGIN_API_VERSION}\n" in text
    assert f"`tensorscope_core.PLUGIN_API_VERSION` is `{hookspecs.PLUGIN_API_VERSION}`" in text


def test_tutorial_python_files_compile() -> None:
    files = tutorial_files(AUTHOR_GUIDE.read_text())
    assert "src/tensorscope_probes/plugin.py" in files and any(p.startswith("tests/") for p in files)
    for path, body in files.items():
        if path.endswith(".py"):
            compile(body, path, "exec")


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None,
                    reason="pip install --no-build-isolation needs setuptools in this environment")
def test_tutorial_plugin_installs_and_passes_its_tests(tmp_path: Path) -> None:
    """The guide's flow: new-plugin, write the guide's files, install, run the plugin's tests."""
    run = [sys.executable, "-m", "tensorscope_core.cli"]
    subprocess.run([*run, "new-plugin", "probes", "--dir", str(tmp_path)], check=True, capture_output=True)
    folder = tmp_path / "tensorscope-probes"
    generated = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    for described in ("pyproject.toml", "README.md", "CHANGELOG.md", "src/tensorscope_probes/__init__.py",
                      "src/tensorscope_probes/plugin.py", "src/tensorscope_probes/metrics.py",
                      "tests/test_probes.py"):
        assert described in generated, f"the guide describes {described}, new-plugin did not write it"
    guide = AUTHOR_GUIDE.read_text()
    excerpts = list(GENERATED_BLOCK.finditer(guide))
    assert excerpts
    for excerpt in excerpts:
        written = (folder / excerpt["path"]).read_text().splitlines()
        for line in excerpt["body"].splitlines():
            assert line in written, f"the guide shows {line!r} in {excerpt['path']}, new-plugin wrote otherwise"
    for rel, body in tutorial_files(guide).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(body)
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                              "--no-build-isolation", "--target", str(site), str(folder)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stdout + install.stderr
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    env.update({ts_plugins.LOAD_ENV: "basic,probes", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1"})
    listed = subprocess.run([*run, "plugins", "--json"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert listed.returncode == 0 and '"tensorscope-probes"' in listed.stdout, listed.stdout + listed.stderr
    assert '"broken"' not in listed.stdout, listed.stdout
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                           cwd=folder, env=env, capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-4000:]


# -- the user guide ---------------------------------------------------------------------------
def test_user_guide_python_examples_run(tmp_path: Path) -> None:
    """The guide's Python blocks, in order, in one fresh process and an empty folder (the first
    block makes the tiny checkpoints the others use)."""
    blocks = re.findall(r"```python\n(.*?)```", USER_GUIDE.read_text(), re.S)
    assert blocks
    script = tmp_path / "guide.py"
    script.write_text("\n".join(blocks))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           ts_plugins.LOAD_ENV: "basic"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


def test_every_cli_command_and_flag_is_in_the_user_guide() -> None:
    text = USER_GUIDE.read_text()
    commands = _subcommands()
    assert {"analyze", "plan", "plugins", "metrics", "explain", "demo", "new-plugin"} <= set(commands)
    for name, parser in commands.items():
        assert f"tensorscope {name}" in text, f"`tensorscope {name}` is not in {USER_GUIDE.name}"
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert f"`{option}" in text, f"`tensorscope {name} {option}` is not in {USER_GUIDE.name}"
    assert "--version" in text


def test_every_run_setting_is_in_the_user_guide() -> None:
    text = USER_GUIDE.read_text()
    for field in RunConfig.model_fields:
        assert f"| `{field}` |" in text, f"RunConfig.{field} is not in the user guide's table"


def test_every_error_type_is_in_the_user_guide() -> None:
    text = USER_GUIDE.read_text()
    for name, obj in vars(errors).items():
        if isinstance(obj, type) and issubclass(obj, errors.TensorScopeError) and obj is not errors.TensorScopeError:
            assert f"`{name}`" in text, f"{name} is not in the user guide's error table"


def test_exit_codes_in_the_user_guide_match_the_errors() -> None:
    text = USER_GUIDE.read_text()
    for cls in (errors.UnknownMetricError, errors.BadParameterError, errors.PlanDoesNotFitError,
                errors.ModelLoadError, errors.DataError):
        assert f"| `{cls.__name__}` | {cls.exit_code} |" in text, cls.__name__


# -- links ------------------------------------------------------------------------------------
def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_docs_resolve() -> None:
    pages = {p.name: p.read_text() for p in DOCS.glob("*.md")}
    anchors = {name: {_slug(h) for h in re.findall(r"^#+ (.*)$", re.sub(r"```.*?```", "", text, flags=re.S), re.M)}
               for name, text in pages.items()}
    for name, text in pages.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            page, _, anchor = target.partition("#")
            page = page or name
            if not page.endswith(".md"):
                assert (DOCS / page).exists(), f"{name} links to missing {page}"
                continue
            assert page in pages, f"{name} links to missing {page}"
            assert not anchor or anchor in anchors[page], f"{name} links to missing #{anchor} in {page}"
