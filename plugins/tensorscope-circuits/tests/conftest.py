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


@pytest.fixture(scope="session")
def neox_model(tmp_path_factory) -> Path:
    """A tiny GPT-NeoX (partial rotary, fused per-head QKV), 2 blocks, with tokenizer."""
    return tiny_model("neox", tmp_path_factory.mktemp("circuits-neox") / "neox", seed=0)


@pytest.fixture(scope="session")
def demo_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """{"before", "after"}: the core demo's 2-layer model at step 0 and after 100 AdamW steps on
    repeated random sequences (batch 32; with seed 0 its layer-1 heads score as induction heads on
    the demo's period-16 repeats from about step 80).
    Trained once per session: about 6 s of CPU."""
    from tensorscope_core.demo import train

    folders = train(tmp_path_factory.mktemp("circuits-demo"), steps=(0, 100), batch_size=32, log=lambda _: None)
    return {"before": folders["step-0000"], "after": folders["step-0100"]}
