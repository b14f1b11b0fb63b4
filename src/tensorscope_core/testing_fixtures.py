"""pytest fixtures for plugin test suites: import them into a ``conftest.py``.

    from tensorscope_core.testing_fixtures import models, one_thread, tokenizer  # noqa: F401

``one_thread`` (autouse) runs the session on one intra-op thread, ``tokenizer`` is the offline
word-level tokenizer, and ``models`` maps ``gpt2``, ``llama`` (grouped-query, rotary) and ``bert``
to tiny 2-block models saved with ``save_pretrained``, built once per session. ``no_disk_room``
makes the scratch file system look full for one test, so memory ladders offer their lossy rungs
instead of the exact disk rung.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .example_store import GradientStore
from .testing import single_thread, tiny_model, tiny_tokenizer


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on one intra-op thread (see tensorscope_core.testing.single_thread)."""
    with single_thread():
        yield


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{family: folder}: tiny GPT-2, LLaMA (grouped-query, rotary) and BERT, 2 blocks, with tokenizer."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: tiny_model(family, root / family, seed=0) for family in ("gpt2", "llama", "bert")}


@pytest.fixture
def no_disk_room(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scratch folder's file system is full (``GradientStore.disk_room`` is 0) for one test."""
    monkeypatch.setattr(GradientStore, "disk_room", staticmethod(lambda: 0))
