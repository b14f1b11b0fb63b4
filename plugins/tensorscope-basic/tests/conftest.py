"""Shared fixtures: one tiny random model per family, saved once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from basic_reference import padded_texts

from tensorscope_core import builtin_corpus
from tensorscope_core.testing import random_token_data, single_thread, tiny_model, tiny_tokenizer


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models on one intra-op thread (see tensorscope_core.testing.single_thread)."""
    with single_thread():
        yield


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def vocab(tokenizer) -> int:
    return len(tokenizer)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """{family: folder} for GPT-2, LLaMA (grouped-query, rotary) and BERT, each saved with
    save_pretrained together with the word-level tokenizer."""
    root = tmp_path_factory.mktemp("basic-models")
    return {family: tiny_model(family, root / family, seed=0) for family in ("gpt2", "llama", "bert")}


@pytest.fixture(scope="session")
def token_ids(vocab) -> torch.Tensor:
    """8 unpadded sequences of 16 random ids (two batches of 4)."""
    return random_token_data(vocab, n=8, length=16, seed=1)


@pytest.fixture(scope="session")
def texts() -> list[str]:
    """12 texts of 2 to 21 tokens: every batch of 4 is padded."""
    return padded_texts(builtin_corpus())
