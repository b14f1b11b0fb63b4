"""The demo trains through the induction phase change: loss on held-out repeated sequences
falls from ln 64 (nothing predictable) towards ln 64 / 2 (the repeated half predictable)."""

from __future__ import annotations

import math
from pathlib import Path

from tensorscope_core.demo import run_demo
from tensorscope_core.results import Results


def test_demo_trains_saves_checkpoints_and_analyses_them(tmp_path: Path) -> None:
    results = run_demo(tmp_path, steps=(0, 150), log=lambda _: None)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000", "step-0150"]
    before = results.get("basic.loss", model="step-0000").value("loss")
    after = results.get("basic.loss", model="step-0150").value("loss")
    assert abs(before - math.log(64)) < 0.15
    assert after < math.log(64) / 2 + 0.35
    for model in results.record.models:  # task metrics of installed plugins skip untasked data, with a reason
        assert all(r.status == "ok" or (r.status == "skipped" and r.reason) for r in model.metrics.values()), \
            model.metrics
        assert model.metrics["basic.loss"].ok
    loaded = Results.load(tmp_path)  # NaN (a value that is not defined) is null in JSON: compare as written
    assert loaded.record.model_dump_json() == results.record.model_dump_json()
    assert (tmp_path / "results.csv").exists() and (tmp_path / "data.safetensors").exists()
    html = (tmp_path / "report.html").read_text()
    assert "step-0150" in html and "data:image/svg+xml" in html  # plots inline as SVG
    assert (tmp_path / "report.pdf").read_bytes().startswith(b"%PDF")
