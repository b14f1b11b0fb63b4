"""Shared fixtures: the core's tiny models and one-thread session (tensorscope_core.testing_fixtures)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorscope_core.testing import tiny_model
from tensorscope_core.testing_fixtures import models, one_thread, tokenizer  # noqa: F401


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
    from tensorscope_core.demo import train  # core internal: the demo's training loop, no public equivalent

    folders = train(tmp_path_factory.mktemp("circuits-demo"), steps=(0, 100), batch_size=32, log=lambda _: None)
    return {"before": folders["step-0000"], "after": folders["step-0100"]}
