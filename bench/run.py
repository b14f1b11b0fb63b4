"""TensorScope benchmarks: capture overhead, pass sharing, declared vs measured bytes, and
gradients.tracin against Captum's TracInCP (bench_tracin.py).

    python bench/run.py [--quick] [--threads N] [--reps R] [--profile] [--skip-tracin] [--out PATH]
    nox -s bench [-- --quick]

Every speed number is a RATIO of two things timed side by side in this process, with the
repetitions interleaved (A, B, A, B, ... with the order reversed on every other repetition)
and reported as the median ratio with the min-max over repetitions: the machines this runs
on are shared and noisy, so absolute seconds mean little. Nothing here is a test; wall-clock
goals are reported, never asserted. See bench/README.md for what each benchmark measures.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime as dt
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import bench_tracin  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from bench_measure import (  # noqa: E402
    Clock,
    RunOutcome,
    TimedRunner,
    bare_forward,
    bare_forward_backward,
    build_runner,
    probe_plugin,
    ratio_str,
    run_ours,
    spread,
    table,
    timed,
    timed_registry,
    verdict,
)
from bench_models import FULL, MODELS, QUICK, BenchSize, describe, random_tokens  # noqa: E402

from tensorscope_core import analyze  # noqa: E402
from tensorscope_core.config import RunConfig, format_bytes  # noqa: E402
from tensorscope_core.data import prepare_data  # noqa: E402
from tensorscope_core.models.load import ModelSource, load_model  # noqa: E402
from tensorscope_core.plugins import Registry, build_registry, get_registry  # noqa: E402

HERE = Path(__file__).resolve().parent
GOALS = {"capture_overhead": 1.15, "sharing_vs_floor": 1.10, "bytes_rel_tol": 0.15}
BASIC_PLUGIN = "tensorscope-basic"
CAPTURE_ONLY = "bench.capture_only"
ALL_ARTIFACTS = "bench.probe_all_artifacts"
CLOCK_NAMES = {"cpu": "CPU time", "wall": "wall clock"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- tables ------------------------------------------------------------------------------------


def fmt_bytes(n: int | None) -> str:
    return "-" if n is None else format_bytes(n)


def bytes_check(declared: int | None, measured: int | None) -> tuple[float | None, bool | None]:
    """measured / declared and whether it is within the tolerance (0 declared and 0 held: exact)."""
    if declared is None or measured is None:
        return None, None
    if declared == 0:
        return (1.0, True) if measured == 0 else (float("inf"), False)
    r = measured / declared
    return r, abs(r - 1.0) <= GOALS["bytes_rel_tol"]


# -- one model ---------------------------------------------------------------------------------


def bench_model(name: str, builder: Callable[[bool], Any], size: BenchSize, registry: Registry,
                profile: bool, primary: str) -> dict[str, Any]:
    log(f"[{name}] building the model")
    model = builder(size.quick)
    info = describe(model)
    ids = random_tokens(model.config.vocab_size, size)
    # a generous budget: the plan must not micro-batch, so both sides time whole batches
    config = RunConfig(seed=0, batch_size=size.batch_size, max_length=size.seq_len, memory_budget="64GiB")
    basic = sorted(m for m, p in registry.metric_plugin.items() if p == BASIC_PLUGIN)

    # fixed, once-per-model work of analyze(), measured on its own (outside the timed loops)
    fixed: dict[str, Clock] = {k: Clock() for k in ("load_model", "prepare_data", "model_fingerprint",
                                                    "data_fingerprint")}
    with timed(fixed["load_model"]):
        view = load_model(ModelSource(model, name=name), registry.adapters, dtype=config.dtype, device=config.device)
    with timed(fixed["prepare_data"]):
        data = prepare_data(ids, view, batch_size=config.batch_size, max_length=config.max_length)
    with timed(fixed["model_fingerprint"]):
        model_fp = view.fingerprint()
    with timed(fixed["data_fingerprint"]):
        data_fp = data.fingerprint()
    one_batch = dataclasses.replace(data, max_batches=1)

    # the installed plugins plus two bench-only probe metrics that ask for artifacts and compute nothing
    basic_artifacts = sorted({a for m in basic for a in registry.metrics[m].artifacts} - {"weights"})
    data_artifacts = sorted(a for a, s in registry.artifacts.items() if s.pass_kind != "weights")
    bench_registry = timed_registry(build_registry(extra_plugins=[("bench-probe", probe_plugin(
        {CAPTURE_ONLY: basic_artifacts, ALL_ARTIFACTS: data_artifacts}))]))

    def maker(metrics: Sequence[str], d: Any = data) -> Callable[[], TimedRunner]:
        return lambda: build_runner(view, d, metrics, bench_registry, config, model_fp, data_fp)

    variants: list[tuple[str, Callable[[], RunOutcome]]] = [
        ("bare_fb", lambda: bare_forward_backward(model, data)),
        ("ours_all", lambda: run_ours(maker(basic), config.seed)),
        ("capture_only", lambda: run_ours(maker([CAPTURE_ONLY]), config.seed)),
        ("bare_f", lambda: bare_forward(model, data)),
        *[(f"alone:{m}", (lambda m=m: run_ours(maker([m]), config.seed))) for m in basic],
    ]
    log(f"[{name}] warm-up (one batch of each code path)")
    bare_forward_backward(model, one_batch)
    bare_forward(model, one_batch)
    run_ours(maker(basic, one_batch), config.seed)

    runs: dict[str, list[RunOutcome]] = {k: [] for k, _ in variants}
    for rep in range(size.reps):
        order = variants if rep % 2 == 0 else variants[::-1]
        start = time.perf_counter()
        for key, fn in order:
            runs[key].append(fn())
        log(f"[{name}] repetition {rep + 1}/{size.reps}: {time.perf_counter() - start:.1f} s "
            f"(bare fwd+bwd {runs['bare_fb'][-1].total.wall:.2f} s, ours {runs['ours_all'][-1].total.wall:.2f} s)")

    out: dict[str, Any] = {"model": info, "fixed_seconds": {k: round(v.wall, 4) for k, v in fixed.items()}}
    out["seconds"] = {k: {"wall": [round(o.total.wall, 4) for o in v], "cpu": [round(o.total.cpu, 4) for o in v]}
                      for k, v in runs.items()}
    out["seconds"]["ours_all.data_pass"] = {"wall": [round(o.pass_clock.wall, 4) for o in runs["ours_all"]],
                                            "cpu": [round(o.pass_clock.cpu, 4) for o in runs["ours_all"]]}
    out["capture"] = capture_numbers(runs, primary)
    out["sharing"] = sharing_numbers(runs, basic, primary)
    out["breakdown"] = breakdown(runs)
    log(f"[{name}] declared vs measured bytes (probe run, analyze() run)")
    out["memory"] = memory_numbers(name, model, view, data, one_batch, runs, basic, registry, bench_registry,
                                   config, model_fp, data_fp, quick=size.quick)
    e2e = out["memory"].pop("analyze_seconds_total")
    ours_total = statistics.median(o.total.wall for o in runs["ours_all"])
    out["analyze_end_to_end"] = {
        "seconds_total": e2e, "median_runner_run_seconds": round(ours_total, 4),
        "fixed_overhead_seconds": round(e2e - ours_total, 4),
        "note": "analyze(model, data, metrics=basic) once, minus the median timed ModelRunner.run(): "
                "loading, data checks, fingerprints, planning and building the record"}
    if profile:
        log(f"[{name}] cProfile of one ours_all run")
        out["profile_top"] = profile_run(maker(basic), config.seed)
    return out


def clock_of(clock: Clock, which: str) -> float:
    return clock.cpu if which == "cpu" else clock.wall


def capture_numbers(runs: dict[str, list[RunOutcome]], primary: str) -> dict[str, Any]:
    bare, ours = runs["bare_fb"], runs["ours_all"]
    out: dict[str, Any] = {"primary_clock": primary, "goal": GOALS["capture_overhead"]}
    for which in ("wall", "cpu"):
        out[which] = {
            "data_pass_over_bare": spread([clock_of(o.pass_clock, which) / clock_of(b.total, which)
                                           for o, b in zip(ours, bare, strict=True)]),
            "run_over_bare": spread([clock_of(o.total, which) / clock_of(b.total, which)
                                     for o, b in zip(ours, bare, strict=True)]),
            "capture_only_over_bare": spread([clock_of(o.pass_clock, which) / clock_of(b.total, which)
                                              for o, b in zip(runs["capture_only"], bare, strict=True)]),
        }
        out[which]["met"] = out[which]["data_pass_over_bare"]["median"] <= GOALS["capture_overhead"]
    out["met"] = out[primary]["met"]
    return out


def sharing_numbers(runs: dict[str, list[RunOutcome]], basic: Sequence[str], primary: str) -> dict[str, Any]:
    reps = len(runs["ours_all"])
    weights_only = [m for m in basic if runs[f"alone:{m}"][0].ran.passes.keys() <= {"weights"}]
    passes_together = dict(runs["ours_all"][0].ran.passes)
    passes_apart: dict[str, int] = {}
    for m in basic:
        for k, v in runs[f"alone:{m}"][0].ran.passes.items():
            passes_apart[k] = passes_apart.get(k, 0) + v
    n_batches = passes_together.get("forward", 0)
    # together: N forward+backward (+ the weights pass); apart: the backward runs carry their
    # forward, the other forwards run without gradients
    extra_fwd = (passes_apart.get("forward", 0) - passes_apart.get("backward", 0)) / max(n_batches, 1)
    out: dict[str, Any] = {
        "primary_clock": primary, "goal": GOALS["sharing_vs_floor"],
        "passes_together": passes_together, "passes_alone_summed": passes_apart,
        "passes_alone": {m: dict(runs[f"alone:{m}"][0].ran.passes) for m in basic},
        "floor_formula": f"(FB + W) / (FB + {extra_fwd:g} x F + W); FB = bare forward+backward of the data, "
                         "F = bare forward without gradients, W = the weights-only run, all from the same repetition",
    }
    for which in ("wall", "cpu"):
        together = [clock_of(runs["ours_all"][r].total, which) for r in range(reps)]
        apart = [sum(clock_of(runs[f"alone:{m}"][r].total, which) for m in basic) for r in range(reps)]
        measured = [t / a for t, a in zip(together, apart, strict=True)]
        # the floor: the passes each side needs, priced with the bare loops of the same repetition
        fb = [clock_of(o.total, which) for o in runs["bare_fb"]]
        f = [clock_of(o.total, which) for o in runs["bare_f"]]
        w = [sum(clock_of(runs[f"alone:{m}"][r].total, which) for m in weights_only) for r in range(reps)]
        floor = [(fb[r] + w[r]) / (fb[r] + extra_fwd * f[r] + w[r]) for r in range(reps)]
        closeness = [m / fl for m, fl in zip(measured, floor, strict=True)]
        out[which] = {"together_over_sum_alone": spread(measured), "floor_from_passes": spread(floor),
                      "measured_over_floor": spread(closeness),
                      "met": statistics.median(closeness) <= GOALS["sharing_vs_floor"]}
    out["met"] = out[primary]["met"]
    return out


def breakdown(runs: dict[str, list[RunOutcome]]) -> dict[str, Any]:
    """Where the combined run's data pass spends time beyond the bare loop (medians over reps)."""
    ours = runs["ours_all"]
    med = statistics.median
    bare = med(o.total.wall for o in runs["bare_fb"])
    data_pass = med(o.pass_clock.wall for o in ours)
    bare_cpu = med(o.total.cpu for o in runs["bare_fb"])
    data_pass_cpu = med(o.pass_clock.cpu for o in ours)
    derive = {k: round(med(o.derive.get(k, 0.0) for o in ours), 4) for k in sorted({k for o in ours for k in o.derive})}
    metrics = {k: round(med(o.ran.results[k].seconds or 0.0 for o in ours), 4)
               for k in ours[0].ran.results}
    return {"bare_fb_seconds": round(bare, 4), "data_pass_seconds": round(data_pass, 4),
            "overhead_seconds": round(data_pass - bare, 4), "bare_fb_cpu_seconds": round(bare_cpu, 4),
            "data_pass_cpu_seconds": round(data_pass_cpu, 4),
            "overhead_cpu_seconds": round(data_pass_cpu - bare_cpu, 4),
            "derive_seconds": derive,
            "metric_seconds": metrics,
            "note": "derive_seconds: the core's artifact derive steps inside the data pass (token_loss replaces "
                    "the loss the bare loop computes inside the model); metric_seconds: each metric's "
                    "setup + update + finalize (finalize runs after the data pass)"}


def memory_numbers(name: str, model: torch.nn.Module, view: Any, data: Any, one_batch: Any,
                   runs: dict[str, list[RunOutcome]], basic: Sequence[str], registry: Registry,
                   bench_registry: Registry, config: RunConfig, model_fp: str, data_fp: str,
                   quick: bool = False) -> dict[str, Any]:
    """Declared vs measured bytes of every installed metric (with --quick: the basic ones, which the timed
    runs measured; every other metric runs once more here at its research defaults, minutes in all)."""
    metric_rows: list[dict[str, Any]] = []
    together = runs["ours_all"][0].ran.results
    for metric in sorted(m for m in registry.metrics if not quick or m in basic):
        if registry.metrics[metric].scope == "model_set":  # runs once per run over models: no per-model state
            metric_rows.append({"metric": metric, "status": "model-set", "declared_bytes": None,
                                "measured_bytes": None, "ratio": None, "within_tolerance": None,
                                "reason": "a model-set metric holds no per-model state; not checked here"})
            continue
        if metric in basic:
            result = runs[f"alone:{metric}"][0].ran.results[metric]
        else:  # other installed plugins: run once, untimed, each call limited to 120 s
            limited = config.model_copy(update={"metric_timeout_s": 120.0})
            try:
                runner = build_runner(view, data, [metric], registry, limited, model_fp, data_fp)
                runner.run()
                result = runner.results[metric]
            except Exception as exc:  # the bench reports, it does not stop
                metric_rows.append({"metric": metric, "status": "bench-error", "declared_bytes": None,
                                    "measured_bytes": None, "ratio": None, "within_tolerance": None,
                                    "reason": f"{type(exc).__name__}: {exc}"})
                continue
        ratio, ok = bytes_check(result.declared_bytes, result.measured_bytes)
        row = {"metric": metric, "status": result.status, "declared_bytes": result.declared_bytes,
               "measured_bytes": result.measured_bytes, "ratio": ratio, "within_tolerance": ok,
               "reason": result.reason}
        if metric in together:
            row["measured_bytes_in_combined_run"] = together[metric].measured_bytes
        metric_rows.append(row)

    # every data artifact: a bench-only metric asks for all of them, one batch
    data_artifacts = sorted(a for a, s in registry.artifacts.items() if s.pass_kind != "weights")
    probe_held: dict[str, int] = {}
    try:
        probe = build_runner(view, one_batch, [ALL_ARTIFACTS], bench_registry, config, model_fp, data_fp)
        probe.run()
        probe_result = probe.results[ALL_ARTIFACTS]
        probe_status = probe_result.status + (f": {probe_result.reason}" if probe_result.reason else "")
        probe_held = dict(probe.artifact_bytes)
    except Exception as exc:  # the bench reports, it does not stop
        probe_status = f"bench-error: {type(exc).__name__}: {exc}"
    combined = runs["ours_all"][0].ran

    # the same numbers as analyze() records them in ModelRecord.artifact_bytes
    start = time.perf_counter()
    results = analyze({name: model}, data.sequences[None], metrics=list(basic), config=config)
    e2e = time.perf_counter() - start
    record = results.record.models[0]
    noted = {name: b.held for name, b in record.artifact_bytes.items()}

    artifact_rows = []
    for a in data_artifacts:
        spec = registry.artifacts[a]
        declared = spec.nbytes(view, config.batch_size, data.max_seq_len)
        held = probe_held.get(a)
        ratio, ok = bytes_check(declared, held)
        artifact_rows.append({
            "artifact": a, "pass": spec.pass_kind, "declared_bytes": declared, "measured_bytes_probe": held,
            "measured_bytes_combined_run": combined.artifact_bytes.get(a),
            "measured_bytes_analyze_notes": noted.get(a), "ratio": ratio, "within_tolerance": ok})
    plan_pass = next(p for p in combined.plan.passes if p.kind != "weights")
    return {
        "metrics": metric_rows, "artifacts": artifact_rows,
        "probe_status": probe_status,
        "combined_plan": {"kind": plan_pass.kind, "artifacts": plan_pass.artifacts,
                          "declared_artifact_bytes": plan_pass.artifact_bytes,
                          "measured_artifact_bytes": sum(combined.artifact_bytes.get(a, 0)
                                                         for a in plan_pass.artifacts),
                          "declared_peak_bytes": combined.plan.peak_bytes},
        "analyze_passes": dict(record.passes),
        "analyze_seconds_total": round(e2e, 4),
        "metrics_goal_met": all(r["within_tolerance"] is not False for r in metric_rows),
        "artifacts_goal_met": all(r["within_tolerance"] is not False for r in artifact_rows),
    }


def profile_run(make: Callable[[], TimedRunner], seed: int, top: int = 25) -> list[dict[str, Any]]:
    runner = make()
    prof = cProfile.Profile()
    torch.manual_seed(seed)
    prof.enable()
    runner.run()
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, fn), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}({fn})", "calls": ncalls,
                     "tottime": round(tottime, 4), "cumtime": round(cumtime, 4)})
    rows.sort(key=lambda r: r["tottime"], reverse=True)
    return rows[:top]


# -- printing ----------------------------------------------------------------------------------


def print_report(report: dict[str, Any]) -> None:
    s = report["settings"]
    print(f"\nTensorScope bench ({'quick' if s['quick'] else 'full'}) {report['date']}  "
          f"torch {report['machine']['torch']}, {s['threads']} thread(s), batch {s['batch_size']} x seq "
          f"{s['seq_len']}, {s['n_batches']} batches per run, {s['reps']} interleaved repetitions")
    primary = s["primary_clock"]
    other = "wall" if primary == "cpu" else "cpu"
    print("ratios: median [min-max] over repetitions; each ratio pairs two runs of the same repetition.")
    print(f"verdicts use the {CLOCK_NAMES[primary]} medians ({other} in brackets). With one thread, "
          "process CPU time is the work done;\nwall time also counts waiting for a core held by other "
          "processes, which on a shared machine is noise.")
    if s["quick"]:
        print("QUICK MODE: a smoke run on 2-layer models; Python overhead dominates, "
              "so the ratios are not the goals' numbers")
    print()
    rows = []
    for name, m in report["models"].items():
        c, sh = m["capture"], m["sharing"]

        def row(label: str, part: dict[str, Any], key: str, goal: str = "", met: bool | None = None,
                first: str = "") -> list[str]:
            return [first, label, ratio_str(part[primary][key]), ratio_str(part[other][key]), goal,
                    "" if met is None else f"{verdict(met)} ({verdict(part[other]['met'])})"]

        rows.append(row("1 capture overhead: data pass / bare fwd+bwd", c, "data_pass_over_bare",
                        f"<= {c['goal']}", c["met"], name))
        rows.append(row("  whole ModelRunner.run() / bare fwd+bwd", c, "run_over_bare"))
        rows.append(row("  core capture only (no-op metric) / bare", c, "capture_only_over_bare"))
        rows.append(row("2 sharing: one run / sum of the 4 alone", sh, "together_over_sum_alone"))
        rows.append(row("  floor from the pass counts", sh, "floor_from_passes"))
        rows.append(row("  measured / floor", sh, "measured_over_floor", f"<= {sh['goal']}", sh["met"]))
        mem = m["memory"]
        worst_m = max((abs(r["ratio"] - 1) for r in mem["metrics"] if r["ratio"] is not None), default=0.0)
        worst_a = max((abs(r["ratio"] - 1) for r in mem["artifacts"] if r["ratio"] is not None), default=0.0)
        rows.append(["", "3 metric bytes: worst |measured/declared - 1|", f"{worst_m:.3f}", "",
                     f"<= {GOALS['bytes_rel_tol']}", verdict(mem["metrics_goal_met"])])
        rows.append(["", "  artifact bytes: worst |held/declared - 1|", f"{worst_a:.3f}", "",
                     f"<= {GOALS['bytes_rel_tol']}", verdict(mem["artifacts_goal_met"])])
    print(table(["model", "benchmark", CLOCK_NAMES[primary], CLOCK_NAMES[other], "goal",
                 f"verdict {primary} ({other})"], rows))

    for name, m in report["models"].items():
        sh = m["sharing"]
        print(f"\n[{name}] {m['model']['n_params'] / 1e6:.1f} M parameters, {m['model']['n_layers']} layers, "
              f"d {m['model']['d_model']}, heads {m['model']['n_heads']}/{m['model']['n_kv_heads']} (q/kv), "
              f"vocab {m['model']['vocab_size']}")
        print(f"  passes, one run (ModelRunner.passes = ModelRecord.passes): {sh['passes_together']}")
        print(f"  passes, each metric alone, summed: {sh['passes_alone_summed']}  "
              + ", ".join(f"{k.split('.')[-1]} {v}" for k, v in sh["passes_alone"].items()))
        print(f"  analyze() ModelRecord.passes: {m['memory']['analyze_passes']}")
        print(f"  floor: {sh['floor_formula']}")
        b = m["breakdown"]
        print(f"  time (medians, CPU / wall): bare fwd+bwd {b['bare_fb_cpu_seconds']:.3f} / "
              f"{b['bare_fb_seconds']:.3f} s,"
              f" our data pass {b['data_pass_cpu_seconds']:.3f} / {b['data_pass_seconds']:.3f} s, difference "
              f"{b['overhead_cpu_seconds']:+.3f} / {b['overhead_seconds']:+.3f} s")
        print("    inside the data pass, artifact derive (wall): "
              + ", ".join(f"{k} {v:.3f} s" for k, v in b["derive_seconds"].items()))
        print("    metric setup+update+finalize (wall, MetricResult.seconds): "
              + ", ".join(f"{k} {v:.3f} s" for k, v in b["metric_seconds"].items()))
        fx = m["fixed_seconds"]
        e2e = m["analyze_end_to_end"]
        print("  once per model, not in the timed loops: " + ", ".join(f"{k} {v:.3f} s" for k, v in fx.items())
              + f"; analyze() end to end {e2e['seconds_total']:.2f} s vs runner "
              f"{e2e['median_runner_run_seconds']:.2f} s "
              f"(fixed overhead {e2e['fixed_overhead_seconds']:+.2f} s)")
        mem = m["memory"]
        print(table(["metric", "status", "declared", "measured", "measured/declared", "within 15%"],
                    [[r["metric"], r["status"], r["declared_bytes"], r["measured_bytes"],
                      "-" if r["ratio"] is None else f"{r['ratio']:.3f}", verdict(r["within_tolerance"])]
                     for r in mem["metrics"]]))
        print(table(["artifact", "pass", "declared/batch", "held (probe)", "held (basic run)", "analyze notes",
                     "held/declared", "within 15%"],
                    [[r["artifact"], r["pass"], format_bytes(r["declared_bytes"]),
                      fmt_bytes(r["measured_bytes_probe"]), fmt_bytes(r["measured_bytes_combined_run"]),
                      fmt_bytes(r["measured_bytes_analyze_notes"]),
                      "-" if r["ratio"] is None else f"{r['ratio']:.3f}", verdict(r["within_tolerance"])]
                     for r in mem["artifacts"]]))
        cp = mem["combined_plan"]
        print(f"  plan of the basic run ({cp['kind']}): artifacts declared "
              f"{format_bytes(cp['declared_artifact_bytes'])}"
              f" per batch, held {format_bytes(cp['measured_artifact_bytes'])}; declared peak "
              f"{format_bytes(cp['declared_peak_bytes'])}")
        if "profile_top" in m:
            print(table(["function (cProfile, by own time)", "calls", "tottime s", "cumtime s"],
                        [[r["function"], r["calls"], r["tottime"], r["cumtime"]] for r in m["profile_top"]]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2-layer d=128 models, a smoke run (< 1 minute)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: on a shared 2-core machine spinning OpenMP "
                             "threads make passes several times slower and far noisier)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default=None,
                        help="clock of the verdicts (default: process CPU time with 1 thread, else wall)")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default: 4 full, 3 quick)")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--profile", action="store_true", help="also cProfile one combined run per model")
    parser.add_argument("--skip-tracin", action="store_true",
                        help="leave out gradients.tracin vs Captum's TracInCP (bench_tracin.py, needs captum)")
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    # one intra-op thread: process CPU time is then the work this process did, unaffected by time
    # spent waiting for a core that other processes hold, so it is the clock the verdicts use
    primary = args.clock or ("cpu" if args.threads == 1 else "wall")
    size = QUICK if args.quick else FULL
    if args.reps:
        size = dataclasses.replace(size, reps=args.reps)
    registry = get_registry()
    started = time.perf_counter()
    report: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "settings": {**dataclasses.asdict(size), "threads": args.threads, "primary_clock": primary,
                     "dtype": "float32", "device": "cpu"},
        "goals": GOALS,
        "plugins": [{"name": p.name, "version": p.version, "status": p.status} for p in registry.plugins],
        "models": {},
    }
    for name in args.models:
        report["models"][name] = bench_model(name, MODELS[name], size, registry, args.profile, primary)
    if not args.skip_tracin:
        tracin_size = bench_tracin.QUICK if args.quick else bench_tracin.FULL
        if args.reps:
            tracin_size = dataclasses.replace(tracin_size, reps=args.reps)
        report["tracin"] = bench_tracin.bench(tracin_size, primary)
    report["seconds_total"] = round(time.perf_counter() - started, 1)
    if hasattr(os, "getloadavg"):
        report["machine"]["load_average_at_end"] = list(os.getloadavg())
    print_report(report)
    if "tracin" in report:
        bench_tracin.print_tracin(report["tracin"])
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nbench took {report['seconds_total']} s; results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
