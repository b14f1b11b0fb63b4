"""The core benchmark still runs against the core it measures: ``bench/run.py --quick`` (one repetition,
TracIn against Captum left out) ends without error and writes its report. The bench drives the
scheduler directly, so an internal change (the memory budget becoming the machine's, say) breaks it
where no other test looks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "run.py"


def test_bench_quick_runs_and_checks_every_basic_metric(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(BENCH), "--quick", "--skip-tracin", "--reps", "1", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    for model in report["models"].values():
        rows = {row["metric"]: row for row in model["memory"]["metrics"]}
        assert {"basic.loss", "basic.grad_norms", "basic.activation_stats", "basic.weight_norms"} <= set(rows)
        assert all(row["status"] == "ok" for row in rows.values())
