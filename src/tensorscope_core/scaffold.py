"""``tensorscope new-plugin NAME``: a plugin skeleton that installs and passes its own test."""

from __future__ import annotations

import re
from pathlib import Path

from . import __version__
from .errors import UsageError

PYPROJECT = '''[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "tensorscope-{name}"
version = "0.1.0"
description = "TensorScope plugin: {name} metrics"
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["tensorscope>={major}.0,<{next_major}"]

[project.optional-dependencies]
test = ["pytest>=8"]

[project.entry-points.tensorscope]
{name} = "tensorscope_{name}.plugin"

[tool.setuptools.packages.find]
where = ["src"]
'''

INIT = '''"""tensorscope-{name}: {name} metrics for TensorScope."""

__version__ = "0.1.0"
'''

PLUGIN = '''"""Entry point: registers this plugin's metrics with TensorScope."""

from __future__ import annotations

from collections.abc import Callable

from tensorscope_core.plugin_api import hookimpl

from .metrics import EmbeddingRowNorm

TENSORSCOPE_PLUGIN_API = {api}


@hookimpl
def register_metrics(register: Callable[[type], None]) -> None:
    register(EmbeddingRowNorm)
'''

METRICS = '''"""An example metric to replace with your own."""

from __future__ import annotations

from tensorscope_core.plugin_api import Cost, Metric, ModelView, NoParams, RunShape, ScalarValue


class EmbeddingRowNorm(Metric):
    """Mean L2 norm of the rows of the token embedding matrix (needs no data)."""

    name = "{name}.embedding_row_norm"
    version = "1"
    summary = "mean L2 norm of the token embedding rows"
    Params = NoParams
    artifacts = ("weights",)
    fields = {{"mean_row_norm": "mean over tokens of ||E[token]||_2"}}

    @classmethod
    def cost(cls, params: NoParams, view: ModelView, shape: RunShape) -> Cost:
        return Cost(state_bytes=0)

    def finalize(self) -> dict[str, ScalarValue]:
        assert self.view is not None
        rows = self.view.embed.weight.detach().double().norm(dim=1)
        return {{"mean_row_norm": ScalarValue(value=float(rows.mean()), n=rows.numel())}}
'''

TEST = '''"""Checks the example metric against an independent reference computation."""

from tensorscope_core.testing import check_against_reference, check_declared_cost, get_registry, run_metric, tiny_model


def test_plugin_is_loaded():
    registry = get_registry()
    assert "{name}.embedding_row_norm" in registry.metrics
    assert all(p.status == "ok" for p in registry.plugins if p.name == "tensorscope-{name}")


def test_embedding_row_norm_matches_reference(tmp_path):
    folder = tiny_model("gpt2", tmp_path / "model")
    result = run_metric("{name}.embedding_row_norm", str(folder))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    check_against_reference(result, "mean_row_norm",
                            lambda: model.get_input_embeddings().weight.double().norm(dim=1).mean())
    check_declared_cost(result)
'''

README = '''# tensorscope-{name}

A TensorScope plugin. Install it next to TensorScope:

```
pip install -e ".[test]"     # the plugin and pytest
tensorscope plugins        # lists tensorscope-{name} with its metrics
tensorscope explain {name}.embedding_row_norm
python -m pytest tests
```

## Metrics

- `{name}.embedding_row_norm`: mean L2 norm of the token embedding rows (an example to replace).
'''

CHANGELOG = '''# Changelog

All notable changes to this project are documented here, in the
[Keep a Changelog](https://keepachangelog.com/en/1.1.0/) format; versions follow SemVer.

## [Unreleased]

### Added
- `{name}.embedding_row_norm`, the example metric from `tensorscope new-plugin`.
'''


def write_plugin(name: str, parent: Path) -> Path:
    """Write ``parent/tensorscope-NAME`` and return it; refuses bad names and existing folders."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise UsageError(f"plugin name {name!r} is not a lowercase identifier",
                         "use letters, digits and underscores, starting with a letter (e.g. 'probes')")
    folder = parent / f"tensorscope-{name}"
    if folder.exists():
        raise UsageError(f"{folder} already exists", "choose another name or --dir")
    major = int(__version__.split(".")[0]) if __version__[0].isdigit() else 2
    from .hookspecs import PLUGIN_API_VERSION

    files = {
        "pyproject.toml": PYPROJECT.format(name=name, major=major, next_major=major + 1),
        f"src/tensorscope_{name}/__init__.py": INIT.format(name=name),
        f"src/tensorscope_{name}/plugin.py": PLUGIN.format(api=PLUGIN_API_VERSION),
        f"src/tensorscope_{name}/metrics.py": METRICS.format(name=name),
        f"tests/test_{name}.py": TEST.format(name=name),
        "README.md": README.format(name=name),
        "CHANGELOG.md": CHANGELOG.format(name=name),
    }
    for rel, text in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return folder
