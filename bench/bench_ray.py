"""A sweep of checkpoints on Ray vs one after another here, measured side by side in one run.

    python bench/bench_ray.py [--members 6] [--reps 2] [--quick] [--out PATH]

Six checkpoints of one GPT-2-shaped model (4 layers, d 256; quick: 2 layers, d 64) x a fixed metric
set (basic.loss, basic.grad_norms, basic.activation_stats, geometry.similarity_terms,
fisher.diagonal) on the built-in corpus, on a local Ray cluster of ``os.cpu_count()`` CPUs
(``ray.init(num_cpus=...)``) against the local executor. Every run has its own empty cache dir.

Reported, per repetition, interleaved (local-1, local-N, ray, ray, ... with the order reversed on
every other repetition):
- ``local_1thread_s``: the local executor on one torch thread (what one Ray task gets);
- ``local_s``: the local executor on all CPUs' threads (what a user runs without Ray);
- ``ray_s``: the Ray executor, workers already started (the cluster is started once, before);
- ``ray_cold_s``: the first Ray run after the cluster started (workers import torch);
- ``overhead_per_member_s`` = (ray_s * cpus - local_1thread_s) / members: the extra CPU-seconds a
  member costs on Ray (loading the model again on the worker, shipping data and results);
- the speedups local_s / ray_s and local_1thread_s / ray_s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from tensorscope_core import RunConfig, analyze  # noqa: E402
from tensorscope_core.testing import tiny_tokenizer  # noqa: E402

METRICS = ["basic.loss", "basic.grad_norms", "basic.activation_stats", "geometry.similarity_terms",
           "fisher.diagonal"]


def _checkpoints(root: Path, members: int, quick: bool) -> list[Path]:
    """``members`` random GPT-2-shaped checkpoints (different seeds), saved with the offline tokenizer."""
    tokenizer = tiny_tokenizer()
    layers, d = (2, 64) if quick else (4, 256)
    paths = []
    for i in range(members):
        torch.manual_seed(i)
        model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=d, n_head=4, n_positions=128,
                                           vocab_size=len(tokenizer)))
        path = root / f"step{100 * i}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths


def _timed(paths: list[Path], executor: str, threads: int, cache: Path) -> float:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    analyze(paths, metrics=METRICS, config=RunConfig(executor=executor, cache_dir=cache, max_length=64))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=6)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results-ray.json")
    args = parser.parse_args()
    import ray

    cpus = os.cpu_count() or 1
    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    paths = _checkpoints(root, args.members, args.quick)
    start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    cluster_start_s = time.perf_counter() - start
    ray_cold_s = _timed(paths, "ray", 1, root / "cache-cold")
    reps: list[dict[str, float]] = []
    for rep in range(args.reps):
        order = ["local_1thread_s", "local_s", "ray_s"]
        times: dict[str, float] = {}
        for name in order if rep % 2 == 0 else order[::-1]:
            executor, threads = {"local_1thread_s": ("local", 1), "local_s": ("local", cpus),
                                 "ray_s": ("ray", 1)}[name]
            times[name] = _timed(paths, executor, threads, root / f"cache-{rep}-{name}")
        times["overhead_per_member_s"] = (times["ray_s"] * cpus - times["local_1thread_s"]) / args.members
        times["speedup_vs_local"] = times["local_s"] / times["ray_s"]
        times["speedup_vs_local_1thread"] = times["local_1thread_s"] / times["ray_s"]
        reps.append(times)
        print(json.dumps({"rep": rep, **{k: round(v, 3) for k, v in times.items()}}))
    ray.shutdown()

    def summary(key: str) -> dict[str, float]:
        values = [r[key] for r in reps]
        return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
                "max": round(max(values), 3)}

    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": cpus, "platform": platform.platform(), "torch": torch.__version__,
                    "ray": ray.__version__},
        "members": args.members, "metrics": METRICS, "quick": args.quick,
        "cluster_start_s": round(cluster_start_s, 3), "ray_cold_s": round(ray_cold_s, 3),
        "reps": reps, "summary": {k: summary(k) for k in reps[0]}}
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=2))
    print(f"cluster start {cluster_start_s:.1f} s, first Ray run {ray_cold_s:.1f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
