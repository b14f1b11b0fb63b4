"""Shared fixtures: tiny models built once per test session, torch on one thread."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorscope_core.testing import single_thread, tiny_model, tiny_tokenizer


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models on one intra-op thread (see tensorscope_core.testing.single_thread)."""
    with single_thread():
        yield


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """{family: folder}: tiny GPT-2, LLaMA (grouped-query, rotary) and BERT, 2 blocks, with tokenizer."""
    root = tmp_path_factory.mktemp("circuits-models")
    return {family: tiny_model(family, root / family, seed=0) for family in ("gpt2", "llama", "bert")}
