"""Shared fixtures: the core's tiny models and one-thread session, and a scratch metric that
replays a given series as one scalar per checkpoint (to drive the model-set metrics)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorscope_core.testing import tiny_model
from tensorscope_core.testing_fixtures import models, one_thread, tokenizer  # noqa: F401


@pytest.fixture(scope="session")
def bare_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 without tokenizer (vocabulary 64: pass token ids)."""
    return tiny_model("gpt2", tmp_path_factory.mktemp("dynamics-bare") / "gpt2", with_tokenizer=False)
