"""The ``tensorscope`` command. Exit codes: 0 ok, 1 failure, 2 usage error, 3 plan over budget."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import TensorScopeError, UsageError
from .quiet import quiet_transformers

EPILOG = "exit codes: 0 success, 1 failure, 2 usage error (unknown metric, bad parameter), 3 plan over memory budget"


def _metric_list(text: str) -> str | list[str]:
    return "all" if text.strip() == "all" else [m.strip() for m in text.split(",") if m.strip()]


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _params(pairs: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--param basic.activation_stats.dead_threshold=0.01`` -> {metric: {field: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        metric, dot, field = key.rpartition(".")
        if not sep or not dot or "." not in metric:
            raise UsageError(f"cannot read --param {pair!r}", "write --param family.metric.field=value")
        out.setdefault(metric, {})[field] = _parse_value(value)
    return out


def _pairs(pairs: Sequence[str], flag: str, example: str) -> dict[str, str]:
    """``KEY=VALUE`` options (``--rung``, ``--max-memory``) -> {key: value}."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UsageError(f"cannot read {flag} {pair!r}", f"write {flag} {example}")
        out[key.strip()] = value.strip()
    return out


def _rungs(pairs: Sequence[str]) -> dict[str, str]:
    """``--rung fisher.spectrum=project-4096`` -> {metric: rung}."""
    return _pairs(pairs, "--rung", "family.metric=RUNG")


def _models(specs: Sequence[str]) -> list[str] | dict[str, str]:
    """``name=path`` pairs name the models (model sets); plain paths name themselves."""
    named = [s.partition("=") for s in specs]
    is_named = [bool(sep and name and "/" not in name and not Path(spec).exists())
                for (name, sep, _), spec in zip(named, specs, strict=True)]
    if all(is_named):
        return {name: path for name, _, path in named}
    if any(is_named):
        raise UsageError(f"{specs[is_named.index(True)]!r} is named and {specs[is_named.index(False)]!r} is not: "
                         "named and unnamed models cannot be mixed",
                         "name every model (a=PATH b=PATH) or none")
    return list(specs)


def _data(specs: Sequence[str] | None) -> Any:
    if not specs:
        return None
    pairs = [s.partition("=") for s in specs]
    if all(sep and not Path(s).exists() for (_, sep, _), s in zip(pairs, specs, strict=True)):
        return {task: path for task, _, path in pairs}
    if len(specs) > 1:
        raise UsageError("several --data files need task names", "write --data math=math.jsonl --data code=code.jsonl")
    return specs[0]


def _config(args: argparse.Namespace, **extra: Any) -> Any:
    from pydantic import ValidationError

    from .config import RunConfig

    values = {"seed": args.seed, "batch_size": args.batch_size, "max_length": args.max_length,
              "device": args.device, "dtype": args.dtype, "memory_budget": args.memory_budget,
              "max_batches": args.max_batches,
              "strict_budget": args.strict_budget or None, "rungs": _rungs(args.rung) or None,
              "device_map": args.device_map, "max_memory": _pairs(args.max_memory, "--max-memory", "cpu=2GiB") or None,
              "offload_dir": args.offload_dir, "executor": args.executor, "ray_address": args.ray_address,
              "deterministic": args.deterministic or None, **extra}
    try:
        return RunConfig(**{k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors())
        raise UsageError(f"bad run setting: {problems}", "see `tensorscope analyze --help`") from exc


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    print(json.dumps(payload, indent=2, default=str) if getattr(args, "json", False) else text)


# -- commands -------------------------------------------------------------------------------
def cmd_analyze(args: argparse.Namespace) -> int:
    from .api import analyze
    from .results.store import check_writable_folder, out_dir_lock

    out = Path(args.out)
    check_writable_folder(out, "out dir", "--out")  # before any computing, not at the first write
    config = _config(args, fail_fast=args.fail_fast, metric_timeout_s=args.metric_timeout,
                     cache_dir=None if args.no_cache else out / ".cache", progress=sys.stderr.isatty(),
                     force_recompute=args.force_recompute)
    with out_dir_lock(out):  # a second run into the same folder is refused, not mixed in
        results = analyze(_models(args.models), data=_data(args.data), metrics=_metric_list(args.metrics),
                          config=config, params=_params(args.param), base_config=args.base_config, base=args.base)
        results.save(out)
    summary = [{"model": m.name, "metric": r.metric, "status": r.status, "reason": r.reason}
               for m in results.record.models for r in m.metrics.values()]
    summary += [{"model": "*", "metric": r.metric, "status": r.status, "reason": r.reason}
                for r in results.record.model_set.values()]
    lines = [f"{s['model']:<24} {s['metric']:<32} {s['status']}" + (f"  ({s['reason']})" if s["reason"] else "")
             for s in summary]
    lines.append(f"wrote {out / 'results.json'}, {out / 'results.csv'}")
    _emit(args, {"out": str(out), "results": summary}, "\n".join(lines))
    failed = any(s["status"] == "error" for s in summary)
    return 1 if failed and args.strict else 0


def cmd_plan(args: argparse.Namespace) -> int:
    from .api import plan

    plans = plan(_models(args.models), data=_data(args.data), metrics=_metric_list(args.metrics),
                 config=_config(args), params=_params(args.param), base_config=args.base_config, base=args.base)
    _emit(args, [p.to_dict() for p in plans], "\n\n".join(p.render() for p in plans))
    return 0 if all(p.fits for p in plans) else 3


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import get_registry

    registry = get_registry()
    rows = []
    for plugin in registry.plugins:
        metrics = [{"name": m, "artifacts": list(registry.metrics[m].artifacts),
                    "requires_metrics": list(registry.metrics[m].requires_metrics),
                    "scope": registry.metrics[m].scope} for m in plugin.metrics]
        rows.append({**plugin.model_dump(), "metrics": metrics})
    lines = []
    for row in rows:
        lines.append(f"{row['name']} {row['version'] or ''}  [{row['status']}]")
        if row["error"]:
            lines.append(f"    error: {row['error']}")
        for m in row["metrics"]:
            lines.append(f"    {m['name']:<30} needs {', '.join(m['artifacts'] + m['requires_metrics']) or '-'}")
    _emit(args, rows, "\n".join(lines))
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    from .catalogue import catalogue
    from .plugins import get_registry

    entries = catalogue(get_registry())
    _emit(args, entries, "\n".join(f"{e['name']:<32} {e['summary']}" for e in entries) or "no metrics installed")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .catalogue import catalogue, explain_text
    from .plugins import get_registry

    registry = get_registry()
    registry.metric(args.metric)  # unknown -> UnknownMetricError with suggestions
    entry = next(e for e in catalogue(registry) if e["name"] == args.metric)
    _emit(args, entry, explain_text(entry))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    results = run_demo(args.out, seed=args.seed, log=log, recipe=args.recipe)
    if args.json:
        print(json.dumps({"out": args.out, "models": results.models}, indent=2))
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from .config import format_bytes
    from .results.store import cache_entries, cache_stats, remove_entries

    root = Path(args.cache_dir) if args.cache_dir else Path(args.out) / ".cache"
    entries = [e for e in cache_entries(root) if args.model is None or e.model == args.model.rstrip("/")]
    if args.action == "ls":
        rows = [dataclasses.asdict(e) for e in entries]
        _emit(args, rows, "\n".join(f"{e.model or '?':<24} {e.metric:<32} {e.status:<8} {format_bytes(e.nbytes):>10}"
                                    f"  {e.key}" for e in entries) or f"no entries in {root}")
    elif args.action == "stats":
        stats = cache_stats(entries)
        lines = [f"{row['model']:<24} {row['metric']:<32} {row['entries']:>5}  {format_bytes(row['bytes']):>10}"
                 for row in stats["metrics"]]
        lines.append(f"{stats['entries']} entries, {format_bytes(stats['bytes'])} in {root}")
        _emit(args, {"cache_dir": str(root), **stats}, "\n".join(lines))
    else:
        freed = remove_entries(root, entries)
        _emit(args, {"cache_dir": str(root), "removed": len(entries), "bytes": freed},
              f"removed {len(entries)} entries ({format_bytes(freed)}) from {root}")
    return 0


def _outcome(path: str | None) -> dict[str, float] | None:
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
        return {str(k): float(v) for k, v in data.items()}
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise UsageError(f"cannot read --outcome {path}: {exc}",
                         'write a JSON object {"model name": number, ...}') from exc


def cmd_report(args: argparse.Namespace) -> int:
    from .errors import PdfUnavailableError
    from .report.build import ensure_analyses, save_report
    from .report.html import render_html
    from .report.pdf import html_to_pdf
    from .results import Results
    from .results.store import atomic_write

    source = Path(args.results)
    results = Results.load(source)
    options = (args.order, args.outcome, args.unit, args.min_n, args.fdr, args.method)
    if any(o is not None for o in options):  # new settings: recompute what a saved report held
        results.comparisons, results.correlations = None, {}
    folder = source if source.is_dir() else source.parent
    html_path = Path(args.html) if args.html else None
    if not (args.html or args.pdf or args.save_json):
        html_path = folder / "report.html"
    ensure_analyses(results, units=args.unit, method=args.method or "spearman",
                    min_n=30 if args.min_n is None else args.min_n, fdr=0.05 if args.fdr is None else args.fdr,
                    order=[m.strip() for m in args.order.split(",") if m.strip()] if args.order else None,
                    outcome=_outcome(args.outcome))
    wrote: dict[str, str] = {}
    if args.save_json:
        wrote["json"] = str(save_report(results, Path(args.save_json)))
    html = render_html(results, progress=sys.stderr.isatty()) if (html_path or args.pdf) else ""
    if html_path is not None:
        with atomic_write(html_path) as handle:
            handle.write(html)
        wrote["html"] = str(html_path)
    if args.pdf:
        pdf = Path(args.pdf)
        try:
            wrote["pdf"] = str(html_to_pdf(html, pdf))
        except PdfUnavailableError as exc:
            if html_path is None:
                html_path = pdf.with_suffix(".html")
                with atomic_write(html_path) as handle:
                    handle.write(html)
            raise PdfUnavailableError(exc.detail, str(html_path)) from exc
    found = [f for d in results.correlations.values() for f in d.significant]
    notes = (results.comparisons.warnings if results.comparisons else []) + [
        w for d in results.correlations.values() for w in d.warnings]
    lines = [f"wrote {path}" for path in wrote.values()]
    lines.append(f"{len(found)} significant correlation(s) over "
                 f"{', '.join(results.correlations) or 'no unit'}")
    lines += [f"warning: {w}" for w in notes]
    _emit(args, {"wrote": wrote, "significant_findings": len(found), "warnings": notes}, "\n".join(lines))
    return 0


def cmd_fim(args: argparse.Namespace) -> int:
    from .fim_report import write_fim_files
    from .results import Results

    paths = write_fim_files(Results.load(args.results), Path(args.out), source=str(args.results))
    _emit(args, {"wrote": {k: str(v) for k, v in paths.items()}}, "\n".join(f"wrote {v}" for v in paths.values()))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .results import Results

    source = Path(args.results)
    beside = (source if source.is_dir() else source.parent) / "report.html"
    report = args.report or (str(beside) if beside.is_file() and not args.no_report else None)
    summary = Results.load(source).export(tensorboard=args.tensorboard, wandb_dir=args.wandb_offline,
                                          mlflow_uri=args.mlflow, report=report, name=args.name)
    lines = [f"wrote {d}" for d in summary.destinations]
    lines.append(f"{summary.scalars} scalars, {summary.tables} tables, {summary.texts} texts at step(s) "
                 f"{', '.join(map(str, summary.steps)) or '-'}")
    if summary.report:
        lines.append(f"attached {summary.report}")
    _emit(args, summary.to_dict(), "\n".join(lines))
    return 0


def cmd_new_plugin(args: argparse.Namespace) -> int:
    from .scaffold import write_plugin

    folder = write_plugin(args.name, Path(args.dir))
    _emit(args, {"folder": str(folder)},
          f"wrote {folder}\nnext: pip install -e '{folder}[test]' && python -m pytest {folder}/tests")
    return 0


# -- parser ---------------------------------------------------------------------------------
def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="model folder, .safetensors/.pt (with --base-config) or .gguf; name=path names it")
    p.add_argument("--metrics", default="all", help="comma-separated metric names, or 'all' (default)")
    p.add_argument("--data", action="append", metavar="[TASK=]FILE",
                   help=".txt (one example per line), .jsonl with a 'text' field, or token ids in .safetensors "
                        "('input_ids') / .pt; repeat with TASK= for tasks; "
                        "default: the built-in corpus")
    p.add_argument("--param", action="append", default=[], metavar="METRIC.FIELD=VALUE", help="metric parameter")
    p.add_argument("--base-config", help="folder with config.json for bare state-dict files")
    p.add_argument("--base", metavar="BASE_MODEL",
                   help="base model of a model set (its fine-tunes are the MODELs); analysed as 'base'")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--max-batches", type=int, help="stop after this many batches per task")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps, or auto (cuda, else mps, else cpu)")
    p.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "float16", "auto"],
                   help="the dtype the model runs in (default float32; auto: the checkpoint's torch_dtype)")
    p.add_argument("--deterministic", action="store_true",
                   help="torch deterministic algorithms and cuBLAS's fixed workspace for the run")
    p.add_argument("--memory-budget", help="e.g. 4GiB (the plan must fit before anything runs); "
                                          "default: the device's free memory now, less a margin")
    p.add_argument("--device-map", metavar="MAP",
                   help="spread a model folder over devices with accelerate: auto, balanced or sequential "
                        "(layers across GPUs, CPU and disk); only metrics that support it run")
    p.add_argument("--max-memory", action="append", default=[], metavar="DEVICE=SIZE",
                   help="memory accelerate may fill with weights per device, e.g. 0=70GiB cpu=2GiB (repeat)")
    p.add_argument("--offload-dir", metavar="DIR", help="where accelerate keeps the weights it offloads to disk")
    p.add_argument("--strict-budget", action="store_true",
                   help="exit 3 when the plan is over budget instead of stepping metrics down their ladders "
                        "or leaving some out")
    p.add_argument("--rung", action="append", default=[], metavar="METRIC=RUNG",
                   help="run METRIC at this rung of its memory ladder ('asked': as given, never stepped down); "
                        "a rung the metric lacks is refused with its rungs listed")
    p.add_argument("--executor", choices=["local", "ray"],
                   help="where the models' stages run: local (default, one after another) or ray (one Ray task "
                        "per model; pip install 'tensorscope[ray]')")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="with --executor ray: 'auto' joins the cluster of `ray start --head`, or ray://HOST:10001 "
                        "(default: start a local cluster)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tensorscope", epilog=EPILOG,
                                     description="Many analysis metrics of a model in one shared run.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"tensorscope {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("analyze", help="run metrics on models and write results", epilog=EPILOG)
    _run_options(p)
    p.add_argument("--out", required=True, help="output folder (results.json, results.csv, tensors.safetensors)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing metric")
    p.add_argument("--metric-timeout", type=float, help="seconds after which a metric gets an error result")
    p.add_argument("--no-cache", action="store_true", help="recompute everything (default: resume from OUT/.cache)")
    p.add_argument("--force-recompute", action="store_true",
                   help="compute every metric again and overwrite its entry in OUT/.cache")
    p.add_argument("--strict", action="store_true", help="exit 1 when any metric ended in error")
    p.set_defaults(fn=cmd_analyze)

    p = sub.add_parser("plan", help="show the passes and declared memory without running", epilog=EPILOG)
    _run_options(p)
    p.set_defaults(fn=cmd_plan)

    for name, fn, text in (("plugins", cmd_plugins, "installed plugins, their status and metrics"),
                           ("metrics", cmd_metrics, "the metric catalogue")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(fn=fn)

    p = sub.add_parser("explain", help="what a metric computes, its needs, parameters and fields")
    p.add_argument("metric")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_explain)

    p = sub.add_parser("demo", help="train a tiny model through its induction-head phase change and analyse it")
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", choices=["induction", "multitask"], default="induction",
                   help="induction (default): checkpoints through the induction phase change; multitask: two "
                        "tasks, per-task Fisher, masks, overlap and curvature side by side")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("cache", help="list, count or clear the result cache of an --out folder", epilog=EPILOG)
    p.add_argument("action", choices=["ls", "stats", "clear"])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", default=".", help="the --out folder of `tensorscope analyze` (cache: OUT/.cache; "
                                                  "default: this folder)")
    where.add_argument("--cache-dir", help="the cache folder itself")
    p.add_argument("--model", help="only the entries of this model (by its name in the results)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_cache)

    p = sub.add_parser("report", help="HTML / PDF report, comparisons and correlation findings from results.json",
                       epilog=EPILOG + "; PDF without weasyprint/pango: exit 1 after writing the HTML")
    p.add_argument("results", help="results.json (or its folder) written by `tensorscope analyze` or save_report()")
    p.add_argument("--html", metavar="PATH", help="write the HTML report here (default without any output "
                                                  "option: report.html beside the results)")
    p.add_argument("--pdf", metavar="PATH", help="write the PDF report here (needs weasyprint and pango)")
    p.add_argument("--save-json", metavar="PATH", help="write the results with comparisons and findings added "
                                                       "(and results.csv beside it)")
    p.add_argument("--unit", action="append", choices=["layer", "head", "model", "checkpoint"],
                   help="unit(s) of analysis for correlation discovery (repeat; default: every unit with "
                        "two or more metric values)")
    p.add_argument("--method", choices=["spearman", "pearson"], help="correlation (default spearman)")
    p.add_argument("--min-n", type=int, help="no claim below this many observations (default 30)")
    p.add_argument("--fdr", type=float, help="Benjamini-Hochberg level for every test family (default 0.05)")
    p.add_argument("--order", metavar="MODEL,...", help="checkpoint order (default: by the step in the names)")
    p.add_argument("--outcome", metavar="FILE.json", help='a number per model, {"model": score}, for early '
                                                         "indicators")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("fim", help="the FIM workflow's fim_summary.csv and fim.txt from a run with fisher.hotspots",
                       epilog=EPILOG)
    p.add_argument("results", help="results.json (or its folder) of a run with fisher.hotspots "
                                   "(and fisher.hotspots_compare for several models)")
    p.add_argument("--out", required=True, help="folder for fim_summary.csv and fim.txt")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_fim)

    p = sub.add_parser("export", help="log results to TensorBoard, W&B (offline) and/or MLflow",
                       epilog=EPILOG + "; a missing tracker package: exit 1 naming the extra to install")
    p.add_argument("results", help="results.json (or its folder) written by `tensorscope analyze`")
    p.add_argument("--tensorboard", metavar="DIR", help="TensorBoard log dir (pip install 'tensorscope[tensorboard]')")
    p.add_argument("--wandb-offline", metavar="DIR", help="an offline W&B run in DIR; upload later with `wandb sync` "
                                                          "(pip install 'tensorscope[wandb]')")
    p.add_argument("--mlflow", metavar="URI", help="MLflow tracking URI, or a folder for a local file store "
                                                  "(pip install 'tensorscope[mlflow]')")
    p.add_argument("--report", metavar="HTML", help="the HTML report to attach (default: report.html beside the "
                                                   "results, when there)")
    p.add_argument("--no-report", action="store_true", help="attach no report")
    p.add_argument("--name", help="the W&B / MLflow run name")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("new-plugin", help="write a plugin skeleton that installs and passes its own test")
    p.add_argument("name", help="family name, e.g. 'probes' -> distribution tensorscope-probes")
    p.add_argument("--dir", default=".", help="where to create tensorscope-NAME/")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_new_plugin)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    quiet_transformers()
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args))
    except TensorScopeError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": type(exc).__name__, "problem": exc.problem, "fix": exc.fix,
                              "plan": getattr(exc, "plan_text", None)}, indent=2))
        else:
            print(f"error: {exc.problem}", file=sys.stderr)
            if exc.fix:
                print(f"  fix: {exc.fix}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # output piped into `head` and closed early: not an error of ours
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (stop the interpreter's flush from failing again)
        return 0
    except Exception as exc:
        if not getattr(args, "json", False):
            raise  # a bug of ours or a plugin's: the traceback is what a report of it needs
        print(json.dumps({"error": type(exc).__name__, "problem": f"unexpected error: {exc}",
                          "fix": "this is a bug: run the command again without --json for the traceback, and "
                                 "report it", "plan": None}, indent=2))
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished metrics are in the cache; run the same command again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
