"""Shared fixtures: tiny models built once per test session, torch on one thread."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from gradients_reference import plant_conflicts

from tensorscope_core import builtin_corpus
from tensorscope_core.testing import single_thread, tiny_model, tiny_tokenizer
from tensorscope_core.testing_fixtures import no_disk_room  # noqa: F401


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
    """{family: folder}: tiny GPT-2 and LLaMA (grouped-query, rotary), 2 blocks, with tokenizer."""
    root = tmp_path_factory.mktemp("gradient-models")
    return {family: tiny_model(family, root / family, seed=0) for family in ("gpt2", "llama")}


@pytest.fixture(scope="session")
def bert(tmp_path_factory) -> Path:
    """A tiny BERT (masked LM) with tokenizer, for the runs that check an encoder too."""
    return tiny_model("bert", tmp_path_factory.mktemp("gradient-bert") / "bert", seed=0)


@pytest.fixture(scope="session")
def texts() -> list[str]:
    """12 texts of different lengths (every batch of 4 is padded)."""
    corpus = builtin_corpus()
    short = ["the sea", "A small boat left the harbour", "the door", "She counted the steps"]
    out = list(corpus[:8])
    for i, s in enumerate(short):
        out.insert(2 * i + 1, s)
    return out


@dataclass
class Planted:
    """A model and two tasks of 2-token examples [context, target]: the first ``k`` examples of
    task 'a' and of task 'b' share their context and have exactly opposite gradients; every
    other token is used once."""

    folder: Path
    a: torch.Tensor
    b: torch.Tensor
    k: int
    spare: list[int]


def make_planted(src: Path, dst: Path, vocab: int, n: int = 12, k: int = 3, seed: int = 100) -> Planted:
    gen = torch.Generator().manual_seed(seed)
    perm = (torch.randperm(vocab - 4, generator=gen) + 4).tolist()
    ctx_a, y = perm[:n], perm[n:2 * n]
    ctx_b, z = ctx_a[:k] + perm[2 * n:3 * n - k], perm[3 * n:4 * n]
    spare = perm[4 * n:]
    folder = plant_conflicts(src, dst, ctx_a[:k], list(zip(y[:k], z[:k], strict=True)),
                             ctx_a + ctx_b[k:] + spare[:8])
    a = torch.tensor([[c, t] for c, t in zip(ctx_a, y, strict=True)])
    b = torch.tensor([[c, t] for c, t in zip(ctx_b, z, strict=True)])
    return Planted(folder, a, b, k, spare)


@pytest.fixture(scope="session")
def planted(models, vocab, tmp_path_factory) -> dict[str, Planted]:
    root = tmp_path_factory.mktemp("planted")
    return {family: make_planted(models[family], root / family, vocab) for family in ("gpt2", "llama")}
