"""``kill -9`` at five moments of a 3-model run: running the same command again always gives the
values of an uninterrupted run (the cache holds only whole results; outputs are written as a set)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

METRICS = "basic.loss,basic.grad_norms,basic.activation_stats,geometry.similarity_terms"
#: the moments of the kills: fractions of an uninterrupted run's wall time (start-up included), and None for
#: "just after the first result reached the cache", which a loaded machine's timing cannot make miss
KILL_AT = (0.3, 0.45, 0.6, 0.75, None)


def _command(models: list[Path], out: Path) -> list[str]:
    return [sys.executable, "-m", "tensorscope_core.cli", "analyze", *map(str, models), "--metrics", METRICS,
            "--out", str(out), "--json"]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _values(out: Path) -> dict[tuple[str, str], Any]:
    """Every metric's status and values per model (not its timing or cache provenance)."""
    record = json.loads((out / "results.json").read_text())
    return {(m["name"].rsplit("/", 1)[-1], name): (r["status"], r["values"])
            for m in record["models"] for name, r in m["metrics"].items()}


def test_kill_9_at_five_moments_always_resumes_to_the_same_values(model_dirs: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    models = [model_dirs["gpt2"], model_dirs["llama"], model_dirs["bert"]]
    start = time.perf_counter()
    subprocess.run(_command(models, tmp_path / "whole"), env=_env(), check=True, capture_output=True)
    whole_s = time.perf_counter() - start
    reference = _values(tmp_path / "whole")
    assert len(reference) == 3 * len(METRICS.split(",")) and all(s == "ok" for s, _ in reference.values())
    resumed_from_cache = 0
    for i, fraction in enumerate(KILL_AT):
        out = tmp_path / f"killed-{i}"
        process = subprocess.Popen(_command(models, out), env=_env(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        if fraction is None:
            _wait_for_a_cached_result(out / ".cache", process)
        else:
            time.sleep(fraction * whole_s)
        process.send_signal(signal.SIGKILL)
        process.wait()
        done = subprocess.run(_command(models, out), env=_env(), capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        assert _values(out) == reference, f"resumed after a kill at moment {fraction}"
        assert not list(out.rglob("*.tmp")), "no temporary file survives a finished run"
        record = json.loads((out / "results.json").read_text())
        resumed_from_cache += sum(r["from_cache"] for m in record["models"] for r in m["metrics"].values())
    # a kill fell after a metric had finished: a resumed run took its result from the cache
    assert resumed_from_cache > 0


def _wait_for_a_cached_result(cache: Path, process: subprocess.Popen[bytes]) -> None:
    while process.poll() is None and not any(cache.glob("*.json")):
        time.sleep(0.01)
