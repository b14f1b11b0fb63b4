"""Shared fixtures of the core tests: tiny random models (built once per session, offline),
token data, and a way to run analyze() against a registry with extra test metrics."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from core_helpers import FAMILIES, ONLY_BASIC

from tensorscope_core import plugins as ts_plugins
from tensorscope_core.testing import random_token_data, tiny_model

# No test may reach the network (the Hub) or pick up a plugin someone else is editing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine threads
# spinning against other processes make each backward pass hundreds of times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny model (with its word-level tokenizer) per family, plus a GPT-2 saved
    without a tokenizer (vocabulary 64)."""
    root = tmp_path_factory.mktemp("models")
    dirs = {family: tiny_model(family, root / family) for family in FAMILIES}
    dirs["gpt2_notok"] = tiny_model("gpt2", root / "gpt2_notok", with_tokenizer=False)
    return dirs


@pytest.fixture(scope="session")
def basic_registry() -> ts_plugins.Registry:
    """A registry with the core and tensorscope-basic only."""
    previous = os.environ.get(ts_plugins.LOAD_ENV)
    os.environ[ts_plugins.LOAD_ENV] = ONLY_BASIC
    try:
        return ts_plugins.build_registry()
    finally:
        if previous is None:
            os.environ.pop(ts_plugins.LOAD_ENV, None)
        else:
            os.environ[ts_plugins.LOAD_ENV] = previous


@pytest.fixture
def use_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., ts_plugins.Registry]]:
    """``use_registry(MetricA, MetricB)`` makes analyze() see the core, tensorscope-basic and
    a throwaway plugin registering those metrics; the previous registry comes back after
    the test."""

    def install(*metrics: type) -> ts_plugins.Registry:
        monkeypatch.setenv(ts_plugins.LOAD_ENV, ONLY_BASIC)

        def register_metrics(register: Callable[[type], None]) -> None:
            for cls in metrics:
                register(cls)

        registry = ts_plugins.build_registry(
            extra_plugins=[("test-plugin", ts_plugins.plugin_module("x", register_metrics=register_metrics))])
        broken = [p for p in registry.plugins if p.status != "ok"]
        assert not broken, broken
        stack.enter_context(ts_plugins.registry_in_use(registry))
        return registry

    with ExitStack() as stack:
        yield install


@pytest.fixture
def basic_only(basic_registry: ts_plugins.Registry) -> Iterator[None]:
    """Run a test against core + tensorscope-basic only (the previous registry comes back
    after it). Core test modules use it through ``pytestmark``."""
    with ts_plugins.registry_in_use(basic_registry):
        yield


@pytest.fixture
def tokens() -> torch.Tensor:
    """12 sequences of 10 token ids valid for every tiny model (3 batches of 4)."""
    return random_token_data(64, n=12, length=10, seed=1)
