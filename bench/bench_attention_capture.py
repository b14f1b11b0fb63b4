"""What capturing every head's attention pattern adds to the core's shared forward pass.

    python bench/bench_attention_capture.py [--quick] [--threads N] [--reps R] [--clock cpu|wall] [--out PATH]

Per model (the bench's GPT-2-small and LLaMA-GQA shapes, random init, eager attention, eval,
float32 on the CPU), the **data pass of a ModelRunner** is timed for bench-only probe metrics
that ask for artifacts and compute nothing:

- ``base``: ``token_loss`` only: the core's forward pass (no gradients), loss derived;
- ``attn``: ``token_loss`` + ``attn_pattern``: the same pass with ``output_attentions=True``,
  every layer's [batch, heads, seq, seq] probabilities detached and handed to the metrics;
- ``entropy``: ``token_loss`` probe + ``circuits.attention_entropy``: the captured patterns
  consumed by a real metric (its per-batch update, float64 entropies), for scale.

Ratios (median, min-max over interleaved repetitions): attn / base (the capture overhead,
goal <= 1.10) and entropy / base. Diagnostic rows: a bare eager forward against a bare SDPA
forward of the same model and batches (what the eager kernel, which the core always uses so
that attention can be captured, costs by itself), and the declared ``attn_pattern`` bytes per
batch against what the run held.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from bench_measure import Clock, RunOutcome, bare_forward, build_runner, probe_plugin, run_ours, spread, table  # noqa: E402
from bench_models import FULL, MODELS, QUICK, BenchSize, describe, random_tokens  # noqa: E402

from tensorscope_core.config import RunConfig  # noqa: E402
from tensorscope_core.data import prepare_data  # noqa: E402
from tensorscope_core.models.load import ModelSource, load_model  # noqa: E402
from tensorscope_core.plugins import build_registry  # noqa: E402

HERE = Path(__file__).resolve().parent
GOAL = 1.10  # attn / base data pass
BASE, ATTN = "bench.capture_base", "bench.capture_attn"
ENTROPY = "circuits.attention_entropy"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def clock_of(clock: Clock, which: str) -> float:
    return clock.cpu if which == "cpu" else clock.wall


def with_attn_kernel(model: Any, kernel: str, fn: Callable[[], RunOutcome]) -> RunOutcome:
    """Run ``fn`` with the model switched to attention ``kernel``, then back to eager."""
    model.set_attn_implementation(kernel)
    try:
        return fn()
    finally:
        model.set_attn_implementation("eager")


def bench_model(name: str, builder: Callable[[bool], Any], size: BenchSize, which: str) -> dict[str, Any]:
    log(f"[{name}] building the model")
    model = builder(size.quick)
    ids = random_tokens(model.config.vocab_size, size)
    config = RunConfig(seed=0, batch_size=size.batch_size, max_length=size.seq_len, memory_budget="64GiB")
    registry = build_registry(extra_plugins=[("bench-probe", probe_plugin(
        {BASE: ["token_loss"], ATTN: ["token_loss", "attn_pattern"]}))])
    view = load_model(ModelSource(model, name=name), registry.adapters, dtype=config.dtype, device=config.device)
    data = prepare_data(ids, view, batch_size=config.batch_size, max_length=config.max_length)
    model_fp, data_fp = view.fingerprint(), data.fingerprint()

    def maker(metrics: Sequence[str]) -> Callable[[], Any]:
        return lambda: build_runner(view, data, metrics, registry, config, model_fp, data_fp)

    variants: list[tuple[str, Callable[[], RunOutcome]]] = [
        ("base", lambda: run_ours(maker([BASE]), config.seed)),
        ("attn", lambda: run_ours(maker([ATTN]), config.seed)),
        ("entropy", lambda: run_ours(maker([BASE, ENTROPY]), config.seed)),
        ("bare_eager", lambda: bare_forward(model, data)),
        ("bare_sdpa", lambda: with_attn_kernel(model, "sdpa", lambda: bare_forward(model, data))),
    ]
    log(f"[{name}] warm-up")
    for _, fn in variants:
        fn()
    runs: dict[str, list[RunOutcome]] = {k: [] for k, _ in variants}
    for rep in range(size.reps):
        order = variants if rep % 2 == 0 else variants[::-1]
        start = time.perf_counter()
        for key, fn in order:
            runs[key].append(fn())
        log(f"[{name}] repetition {rep + 1}/{size.reps}: {time.perf_counter() - start:.1f} s")

    def pass_seconds(key: str) -> list[float]:
        return [clock_of(o.pass_clock, which) for o in runs[key]]

    def total_seconds(key: str) -> list[float]:
        return [clock_of(o.total, which) for o in runs[key]]

    def ratio(num: list[float], den: list[float]) -> dict[str, Any]:
        return spread([a / b for a, b in zip(num, den, strict=True)])

    held = runs["attn"][-1].ran.artifact_bytes.get("attn_pattern")
    declared = registry.artifacts["attn_pattern"].nbytes(view, size.batch_size, size.seq_len)
    base = pass_seconds("base")
    return {
        "model": describe(model),
        "seconds": {k: {"wall": [round(o.total.wall, 4) for o in v], "cpu": [round(o.total.cpu, 4) for o in v]}
                    for k, v in runs.items()},
        "attn_over_base": ratio(pass_seconds("attn"), base),
        "entropy_over_base": ratio(pass_seconds("entropy"), base),
        "eager_over_sdpa": ratio(total_seconds("bare_eager"), total_seconds("bare_sdpa")),
        "median_base_pass_seconds": round(statistics.median(base), 4),
        "attn_pattern_bytes": {"declared": declared, "held": held},
    }


def print_report(report: dict[str, Any]) -> None:
    def r(s: dict[str, Any]) -> str:
        return f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f})"

    rows = []
    for name, m in report["models"].items():
        ok = m["attn_over_base"]["median"] <= GOAL
        rows.append([name, f"{m['median_base_pass_seconds']:.3f}", r(m["attn_over_base"]), "ok" if ok else "MISSED",
                     r(m["entropy_over_base"]), r(m["eager_over_sdpa"]),
                     f"{m['attn_pattern_bytes']['declared']}/{m['attn_pattern_bytes']['held']}"])
    print(f"attention capture overhead ({report['clock']} time, {report['threads']} thread(s), "
          f"{report['reps']} interleaved repetitions; goal attn/base <= {GOAL})")
    print(table(["model", "base pass s", "attn/base", "goal", "entropy/base", "bare eager/sdpa",
                 "attn bytes declared/held"], rows))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2-layer models, batch 4 x 32 tokens")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--clock", choices=("cpu", "wall"), default=None)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = QUICK if args.quick else FULL
    if args.reps:
        size = BenchSize(size.quick, size.batch_size, size.seq_len, size.n_batches, args.reps)
    which = args.clock or ("cpu" if args.threads == 1 else "wall")
    report: dict[str, Any] = {
        "benchmark": "attention_capture", "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "torch": torch.__version__, "threads": args.threads, "clock": which,
        "reps": size.reps, "size": size.__dict__, "goal": GOAL,
        "models": {name: bench_model(name, MODELS[name], size, which) for name in args.models}}
    print_report(report)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
