"""Every metric on a real model's shape within the machine's memory, as a new user runs it.

    python bench/bench_real_model.py [--quick] [--budget 16GiB] [--machine-memory 16GiB] [--threads N] [--out PATH]

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
30 minutes on 2 CPU cores.

``--machine-memory SIZE`` runs every child as on a machine with SIZE of RAM: in a memory cgroup of its
own limited to SIZE (made under this process's group: cgroup v1 or v2, with write access to it), where
the kernel reclaims and then kills on that limit. ``--budget`` defaults to ``machine`` then: the run's
own default budget, which reads the room under the cgroup's limit and keeps its margin.

``--dispatched`` then runs the whole run again with part of the weights offloaded to disk (``--device-map
auto --max-memory cpu=LIMIT --offload-dir DIR``, LIMIT 60% of the float32 weights) and reports its time
against the plain run's, each metric's status and the largest relative difference of a scalar value
(issue 13: dispatched vs plain).

``--separate`` then runs each metric that ended ``ok`` on its own, as a user would without the shared run
(``tensorscope analyze MODEL --metrics NAME``, same data and budget, a fresh process each: its load, plan,
passes and the metrics it needs), pinned to the rung the whole run gave it (``--rung``), and reports the
whole run's wall time against the sum of theirs (goal: at most 0.35). The separate runs take longer than
the whole one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
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
GOALS = {"peak_rss_gib": 16.0, "wall_minutes": 30.0, "whole_vs_sum": 0.35}


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


class MemoryCgroup:
    """A memory cgroup made for the children, limited to ``limit`` bytes: a machine with that much RAM."""

    def __init__(self, limit: int) -> None:
        from tensorscope_core.machine import CGROUP_MOUNT, PROC_CGROUP, _cgroup_limits

        own: dict[str, Path] = {}  # per hierarchy (its limit file), the process's own group: listed innermost first
        for folder, limit_file, _ in _cgroup_limits(PROC_CGROUP, CGROUP_MOUNT):
            own.setdefault(limit_file, folder)
        self.folder: Path | None = None
        for limit_file, parent in own.items():
            folder = parent / f"tensorscope-bench-{os.getpid()}"
            try:
                folder.mkdir()
                (folder / limit_file).write_text(str(limit))
            except OSError as exc:
                if folder.is_dir():
                    folder.rmdir()
                print(f"no memory cgroup under {parent}: {exc}")
                continue
            self.folder = folder
            break
        if self.folder is None:
            raise SystemExit("--machine-memory needs a memory cgroup this process may make (root, or a delegated "
                             "cgroup v2 subtree); none could be made")

    def join(self) -> None:
        """Move the calling process (a child before it runs the CLI) into the cgroup."""
        assert self.folder is not None
        (self.folder / "cgroup.procs").write_text(str(os.getpid()))

    def oom_kills(self) -> int:
        """Processes the kernel killed in the cgroup for want of memory (v1 ``memory.oom_control``, v2
        ``memory.events``)."""
        assert self.folder is not None
        for name in ("memory.events", "memory.oom_control"):
            path = self.folder / name
            if path.exists():
                fields = dict(line.split() for line in path.read_text().splitlines() if len(line.split()) == 2)
                return int(fields.get("oom_kill", 0))
        return 0

    def remove(self) -> None:
        if self.folder is not None:
            self.folder.rmdir()


def run_cli(args: list[str], threads: int, cgroup: MemoryCgroup | None = None
            ) -> tuple[int, float, float, dict[str, float], str]:
    """Run the CLI in a child (in ``cgroup`` where given); (exit code, wall seconds, child's peak RSS in GiB,
    the split of its resident memory in GiB at the sample where it was largest plus the largest anonymous
    part, output tail)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "tensorscope_core.cli", *args], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             preexec_fn=None if cgroup is None else cgroup.join)
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
    wall = time.perf_counter() - start  # before the sampler's last (up to 1 s) sleep ends
    sampler.join()
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    split = {k: round(v / 2**20, 2) for k, v in at_peak.items()} | {"RssAnon_max": round(most_anon / 2**20, 2)}
    return child.returncode, wall, peak_kib / 2**20, split, output[-6000:]


def metric_rows(out: Path) -> dict[str, dict[str, Any]]:
    """Per metric of a run's ``results.json`` (its models' and its model set's): status, seconds, declared and
    measured bytes, reason, rung, and its scalar values."""
    record = json.loads((out / "results.json").read_text())
    found = [*(m for model in record["models"] for m in model["metrics"].items()),
             *record.get("model_set", {}).items()]
    rows = {}
    for name, r in found:
        rows[name] = {k: r.get(k) for k in ("status", "seconds", "declared_bytes", "measured_bytes", "reason")}
        rows[name]["rung"] = (r.get("rung") or {}).get("name")
        rows[name]["scalars"] = {f: v["value"] for f, v in (r.get("values") or {}).items()
                                 if v.get("kind") == "scalar" and isinstance(v.get("value"), (int, float))}
    return rows


def dispatched_run(common: list[str], root: Path, threads: int, n_params: int, plain_wall: float,
                   plain: dict[str, Any], cgroup: MemoryCgroup | None) -> dict[str, Any]:
    """The whole run again with part of the weights offloaded to disk by accelerate (``--device-map auto``, the
    CPU limited to 60% of the float32 weights; accelerate also keeps room there for the largest module, so on the
    135M shape the embedding and the first blocks stay and the rest goes to disk, and on the quick shape, whose
    embedding is most of the weights, everything goes to disk; the record's note says which):
    its wall time against the plain run's, each metric's status there, and the largest relative difference of
    a scalar value from the plain run's."""
    limit = f"{max(1, n_params * 4 * 6 // 10 // 2**20)}MiB"
    args = ["analyze", *common, "--metrics", "all", "--device-map", "auto", "--max-memory", f"cpu={limit}",
            "--offload-dir", str(root / "offload"), "--out", str(root / "out-dispatched")]
    code, wall, _, _, tail = run_cli(args, threads, cgroup)
    if code != 0:
        return {"exit_code": code, "tail": tail[-3000:]}
    rows = metric_rows(root / "out-dispatched")
    record = json.loads((root / "out-dispatched" / "results.json").read_text())
    placed = [note for model in record["models"] for note in model.get("notes", []) if "dispatched" in note]
    worst = (0.0, "")
    for name, r in rows.items():
        if r["status"] != "ok" or plain.get(name, {}).get("status") != "ok":
            continue
        for field, value in r["scalars"].items():
            want = plain[name]["scalars"].get(field)
            if want is not None and math.isfinite(want) and math.isfinite(value):
                diff = abs(value - want) / max(abs(want), 1e-6)
                worst = max(worst, (diff, f"{name}.{field}"))
    statuses = [r["status"] for r in rows.values()]
    print(f"dispatched (cpu={limit}, the rest on disk; {placed}): {wall:.1f} s against {plain_wall:.1f} s plain "
          f"({wall / plain_wall:.2f}x); ok {statuses.count('ok')}, skipped {statuses.count('skipped')}, "
          f"error {statuses.count('error')}; largest scalar difference {worst[0]:.1e} ({worst[1]})", flush=True)
    return {"exit_code": code, "cpu_limit": limit, "placement": placed, "wall_seconds": round(wall, 1),
            "dispatched_vs_plain": round(wall / plain_wall, 3),
            "status": {n: r["status"] for n, r in rows.items()},
            "reasons": {n: r["reason"] for n, r in rows.items() if r["status"] != "ok"},
            "largest_scalar_rel_diff": worst[0], "at": worst[1]}


def separate_runs(common: list[str], whole: dict[str, Any], root: Path, threads: int,
                  cgroup: MemoryCgroup | None, only: set[str] | None = None) -> dict[str, Any]:
    """Each metric that ended ok in the whole run (of ``only``, when given), alone in a fresh process at the
    whole run's rung: its wall time, exit code, and its status and seconds there."""
    out: dict[str, Any] = {}
    for name, r in sorted(whole.items()):
        if r["status"] != "ok" or (only is not None and name not in only):
            continue
        folder = root / "separate" / name
        pin = ["--rung", f"{name}={r['rung']}"] if r["rung"] else []
        args = ["analyze", *common, "--metrics", name, *pin, "--out", str(folder)]
        code, wall, _, _, tail = run_cli(args, threads, cgroup)
        result = metric_rows(folder).get(name, {}) if code == 0 else {}
        out[name] = {"wall_seconds": round(wall, 1), "exit_code": code, "status": result.get("status"),
                     "seconds": result.get("seconds"), "rung": result.get("rung")}
        print(f"alone {name}: exit {code}, {wall:.1f} s, {out[name]['status']} at {out[name]['rung']}"
              + ("" if code == 0 else f"\n{tail[-1500:]}"), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--budget", default=None,
                        help="the run's --memory-budget; 'machine': the device's free memory (default: 16GiB, "
                             "or 'machine' with --machine-memory)")
    parser.add_argument("--machine-memory", default=None,
                        help="run every child in a memory cgroup limited to this size: a machine with that much RAM")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results-real-model.json")
    parser.add_argument("--separate", action="store_true",
                        help="then run each metric that ended ok on its own (whole run vs the sum of separate runs)")
    parser.add_argument("--dispatched", action="store_true",
                        help="then the whole run again with part of the weights offloaded to disk (--device-map "
                             "auto): time ratio, statuses and values against the plain run")
    parser.add_argument("--separate-only", default=None,
                        help="comma-separated metrics: run only these separately (to complete an earlier "
                             "run's separate runs; whole_vs_sum then covers only them)")
    args = parser.parse_args()
    from tensorscope_core.config import parse_bytes

    args.budget = args.budget or ("machine" if args.machine_memory else "16GiB")
    cgroup = MemoryCgroup(parse_bytes(args.machine_memory)) if args.machine_memory else None
    try:
        report = measure(args, cgroup)
    finally:
        if cgroup is not None:
            cgroup.remove()
    args.out.write_text(json.dumps(report, indent=2))


def measure(args: argparse.Namespace, cgroup: MemoryCgroup | None) -> dict[str, Any]:
    """Every run the arguments ask for, and the report of them."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        n_params = real_shaped_llama(root / "model", args.quick)
        files = token_files(root, 8192 if args.quick else 49152)
        common = [str(root / "model"), "--data", f"train={files['train']}",
                  "--data", f"test={files['test']}", "--batch-size", "2", "--max-length", "64",
                  "--device", args.device, *([] if args.budget == "machine" else ["--memory-budget", args.budget])]
        code, plan_wall, _, _, plan_text = run_cli(["plan", *common, "--metrics", "all"], args.threads, cgroup)
        print(plan_text)
        whole = ["analyze", *common, "--metrics", "all", "--out", str(root / "out")]
        code, wall, peak_gib, resident, tail = run_cli(whole, args.threads, cgroup)
        print(tail)
        results = metric_rows(root / "out") if code == 0 else {}
        dispatched = dispatched_run(common, root, args.threads, n_params, wall, results, cgroup) \
            if args.dispatched and code == 0 else {}
        only = None if args.separate_only is None else set(args.separate_only.split(","))
        separate = separate_runs(common, results, root, args.threads, cgroup, only) \
            if args.separate and code == 0 else {}
    report = {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "threads": args.threads},
        "quick": args.quick, "device": args.device, "n_params": n_params, "budget": args.budget,
        "machine_memory": args.machine_memory, "oom_kills": None if cgroup is None else cgroup.oom_kills(),
        "exit_code": code,
        "plan_seconds": round(plan_wall, 1), "plan": plan_text,
        "wall_seconds": round(wall, 1), "peak_rss_gib": round(peak_gib, 2),
        "resident_gib": resident, "goals": GOALS,
        "met": {"peak_rss": peak_gib < GOALS["peak_rss_gib"], "wall": wall / 60 < GOALS["wall_minutes"]},
        "metrics": results,
    }
    if dispatched:
        report["dispatched"] = dispatched
    if separate:
        alone = sum(r["wall_seconds"] for r in separate.values())
        report.update({"separate": separate, "separate_wall_seconds": round(alone, 1),
                       "whole_vs_sum": round(wall / alone, 3)})
        report["met"]["whole_vs_sum"] = wall / alone <= GOALS["whole_vs_sum"]
        print(f"whole run {wall:.0f} s against {len(separate)} separate runs {alone:.0f} s: "
              f"{wall / alone:.3f} (goal <= {GOALS['whole_vs_sum']})")
    statuses = [r["status"] for r in results.values()]
    print(f"{n_params:,} parameters: exit {code}, wall {wall / 60:.1f} min, peak RSS {peak_gib:.2f} GiB "
          f"(sampled at its largest: {resident}) "
          f"(goals < {GOALS['peak_rss_gib']} GiB, < {GOALS['wall_minutes']} min); "
          f"ok {statuses.count('ok')}, skipped {statuses.count('skipped')}, error {statuses.count('error')}"
          + ("" if cgroup is None else f"; in a cgroup of {args.machine_memory}, {report['oom_kills']} killed by "
             "the kernel for memory"))
    return report


if __name__ == "__main__":
    main()
