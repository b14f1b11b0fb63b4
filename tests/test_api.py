"""The public API surface: analyze_models alias, Analyzer, plan."""

from __future__ import annotations

from pathlib import Path

import pytest

import tensorscope_core as ts
from tensorscope_core.errors import BadParameterError
from tensorscope_core.testing import random_token_data, tiny_model


def test_analyze_models_is_analyze() -> None:
    assert ts.analyze_models is ts.analyze


def test_analyzer_validates_at_construction_and_runs_like_analyze(tmp_path: Path) -> None:
    with pytest.raises(BadParameterError, match="dead_threshold"):
        ts.Analyzer(["basic.activation_stats"], params={"basic.activation_stats": {"dead_threshold": -1}})
    folder = tiny_model("gpt2", tmp_path / "m", with_tokenizer=False)
    data = random_token_data(64, n=6, length=10)
    config = ts.RunConfig(batch_size=3)
    analyzer = ts.Analyzer(["basic.loss"], config=config)
    plans = analyzer.plan(str(folder), data)
    assert [p.kind for p in plans[0].passes] == ["forward"]
    via_class = analyzer.run(str(folder), data).get("basic.loss").value("loss")
    via_function = ts.analyze(str(folder), data, ["basic.loss"], config=config).get("basic.loss").value("loss")
    assert via_class == via_function
