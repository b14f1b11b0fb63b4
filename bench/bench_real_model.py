"""Every metric on a real model's shape within the machine's memory, as a new user runs it.

    python bench/bench_real_model.py [--quick] [--budget 16GiB] [--threads N] [--out PATH]

A random LLaMA with the shape of a real 135M-parameter model (30 layers, d 576, 9 query / 3 key-value
heads, MLP 1536, vocabulary 49,152, tied embeddings; ``--quick``: 4 layers, d 128, vocabulary 8,192)
is saved with ``save_pretrained``; 8 sequences of 64 token ids in two tasks (``train``, ``test``, so
the task and train/test metrics run) are saved as a ``.pt`` file; then, in a fresh process,

    tensorscope analyze MODEL --metrics all --data train=train.pt --data test=test.pt \
        --batch-size 2 --max-length 64 --memory-budget BUDGET --out OUT

runs under ``/usr/bin/time``-style accounting (``resource.getrusage`` of the child: peak RSS), while a
thread reads the child's ``/proc/PID/status`` every second: its resident memory split into anonymous
pages (tensors, the heap) and file-backed pages (memory-mapped files: the disk rungs' scratch stores and
the safetensors weights), whose sum is the RSS. File-backed pages are page cache the kernel can drop
under pressure; the plan declares the anonymous ones. Reported:
the plan (rungs chosen, metrics left out), wall time, peak RSS against the budget, each metric's status,
rung, seconds and declared vs measured state. Goal (issue 13): peak RSS under 16 GiB and wall time under
30 minutes on 2 CPU cores. The whole run against the sum of separate runs of each metric is not measured
at this size here (51 separate loads and passes of a 135M model take hours on 2 cores); bench_core_v2
measures the sharing on smaller models.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
GOALS = {"peak_rss_gib": 16.0, "wall_minutes": 30.0}


def real_shaped_llama(folder: Path, quick: bool) -> int:
    """Save the random 135M-shaped LLaMA (quick: a 4-layer one); returns its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, d, heads, kv, mlp, vocab = (4, 128, 4, 2, 384, 8192) if quick else (30, 576, 9, 3, 1536, 49152)
    config = LlamaConfig(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                         intermediate_size=mlp, vocab_size=vocab, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def token_files(root: Path, vocab: int) -> dict[str, Path]:
    gen = torch.Generator().manual_seed(0)
    files = {}
    for task in ("train", "test"):
        files[task] = root / f"{task}.pt"
        torch.save(torch.randint(0, vocab, (4, 64), generator=gen), files[task])
    return files


#: the resident-memory lines of /proc/PID/status, in KiB
RESIDENT = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def resident_kib(pid: int) -> dict[str, int]:
    """The process's resident memory now by kind (``RESIDENT``); empty once it has exited."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {k: int(fields[k].split()[0]) for k in RESIDENT if k in fields}


def run_cli(args: list[str], threads: int) -> tuple[int, float, float, dict[str, float], str]:
    """Run the CLI in a child; (exit code, wall seconds, child's peak RSS in GiB, the split of its resident
    memory in GiB at the sample where it was largest plus the largest anonymous part, output tail)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "tensorscope_core.cli", *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    at_peak: dict[str, int] = {}
    most_anon = 0

    def sample() -> None:
        nonlocal at_peak, most_anon
        while child.poll() is None:
            now = resident_kib(child.pid)
            if now.get("VmRSS", 0) > at_peak.get("VmRSS", 0):
                at_peak = now
            most_anon = max(most_anon, now.get("RssAnon", 0))
            time.sleep(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = child.communicate()
    sampler.join()
    wall = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    split = {k: round(v / 2**20, 2) for k, v in at_peak.items()} | {"RssAnon_max": round(most_anon / 2**20, 2)}
    return child.returncode, wall, peak_kib / 2**20, split, output[-6000:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budget", default="16GiB",
                        help="the run's --memory-budget; 'machine': the device's free memory")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results-real-model.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n_params = real_shaped_llama(root / "model", args.quick)
        files = token_files(root, 8192 if args.quick else 49152)
        common = [str(root / "model"), "--metrics", "all", "--data", f"train={files['train']}",
                  "--data", f"test={files['test']}", "--batch-size", "2", "--max-length", "64",
                  "--device", args.device, *([] if args.budget == "machine" else ["--memory-budget", args.budget])]
        code, plan_wall, _, _, plan_text = run_cli(["plan", *common], args.threads)
        print(plan_text)
        code, wall, peak_gib, resident, tail = run_cli(["analyze", *common, "--out", str(root / "out")], args.threads)
        print(tail)
        results: dict[str, Any] = {}
        if code == 0:
            record = json.loads((root / "out" / "results.json").read_text())
            for model in record["models"]:
                for name, r in model["metrics"].items():
                    results[name] = {k: r.get(k) for k in ("status", "seconds", "declared_bytes", "measured_bytes",
                                                           "reason")}
                    results[name]["rung"] = (r.get("rung") or {}).get("name")
            for name, r in record.get("model_set", {}).items():
                results[name] = {k: r.get(k) for k in ("status", "seconds", "declared_bytes", "measured_bytes",
                                                       "reason")}
                results[name]["rung"] = (r.get("rung") or {}).get("name")
    report = {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "threads": args.threads},
        "quick": args.quick, "device": args.device, "n_params": n_params, "budget": args.budget, "exit_code": code,
        "plan_seconds": round(plan_wall, 1), "plan": plan_text,
        "wall_seconds": round(wall, 1), "peak_rss_gib": round(peak_gib, 2),
        "resident_gib": resident, "goals": GOALS,
        "met": {"peak_rss": peak_gib < GOALS["peak_rss_gib"], "wall": wall / 60 < GOALS["wall_minutes"]},
        "metrics": results,
    }
    args.out.write_text(json.dumps(report, indent=2))
    statuses = [r["status"] for r in results.values()]
    print(f"{n_params:,} parameters: exit {code}, wall {wall / 60:.1f} min, peak RSS {peak_gib:.2f} GiB "
          f"(sampled at its largest: {resident}) "
          f"(goals < {GOALS['peak_rss_gib']} GiB, < {GOALS['wall_minutes']} min); "
          f"ok {statuses.count('ok')}, skipped {statuses.count('skipped')}, error {statuses.count('error')}")


if __name__ == "__main__":
    main()
