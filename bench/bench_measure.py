"""Timing pieces: the bare loops, a ModelRunner that times its data pass, artifact derive timers,
and the statistics over interleaved repetitions."""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tensorscope_core.config import RunConfig
from tensorscope_core.data import PreparedData
from tensorscope_core.metric import Metric, RunShape
from tensorscope_core.models.view import ModelView
from tensorscope_core.plugins import Registry
from tensorscope_core.scheduler.graph import resolve
from tensorscope_core.scheduler.passes import PassCounter
from tensorscope_core.scheduler.plan import make_plan
from tensorscope_core.scheduler.run import ModelRunner

# -- clocks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaSize:
    """A random LLaMA's shape (``testing.real_shaped_llama``; the full sizes a real 135M model's) and the batch
    and repetitions a benchmark runs it with."""

    layers: int
    d_model: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    batch: int
    seq: int
    reps: int

    def model(self) -> Any:
        from tensorscope_core.testing import real_shaped_llama

        return real_shaped_llama(num_hidden_layers=self.layers, hidden_size=self.d_model,
                                 num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                                 intermediate_size=self.mlp, vocab_size=self.vocab)


#: the 135M shape and the quick 4-layer one, on one batch of 2 x 64 tokens, 3 repetitions
LLAMA_135M = LlamaSize(30, 576, 9, 3, 1536, 49152, 2, 64, 3)
LLAMA_QUICK = LlamaSize(4, 128, 4, 2, 384, 8192, 2, 64, 3)


@dataclass
class Clock:
    """Wall and process CPU seconds of one timed block."""

    wall: float = 0.0
    cpu: float = 0.0


class timed:  # noqa: N801 (used as a context manager)
    def __init__(self, into: Clock) -> None:
        self.into = into

    def __enter__(self) -> timed:
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.into.wall += time.perf_counter() - self._w
        self.into.cpu += time.process_time() - self._c


# -- what the core's own work costs, per artifact derive -------------------------------------

#: seconds spent in each artifact's ``derive`` since the last reset (filled by timed_registry)
DERIVE_SECONDS: dict[str, float] = {}


def timed_registry(registry: Registry) -> Registry:
    """A copy of ``registry`` whose artifact derive functions record their time in DERIVE_SECONDS.

    The wrapper costs two perf_counter calls per derive per micro-batch (microseconds), so the
    timed runs use it too; hooks installed by ``install`` are not wrapped.
    """

    def wrap(name: str, fn: Callable[[Any], None]) -> Callable[[Any], None]:
        def derive(ctx: Any) -> None:
            start = time.perf_counter()
            try:
                fn(ctx)
            finally:
                DERIVE_SECONDS[name] = DERIVE_SECONDS.get(name, 0.0) + time.perf_counter() - start
        return derive

    artifacts = {name: spec if spec.derive is None else dataclasses.replace(spec, derive=wrap(name, spec.derive))
                 for name, spec in registry.artifacts.items()}
    return dataclasses.replace(registry, artifacts=artifacts)


# -- a ModelRunner built by hand (no loading, no fingerprinting in the timed region) -----------


@dataclass(kw_only=True)
class TimedRunner(ModelRunner):
    """ModelRunner that also times its shared data pass(es)."""

    data_pass: Clock = field(default_factory=Clock)

    def _data_pass(self, group: list[Any]) -> None:
        with timed(self.data_pass):
            super()._data_pass(group)


def build_runner(view: ModelView, data: PreparedData, metrics: Sequence[str], registry: Registry,
                 config: RunConfig, model_fingerprint: str, data_fingerprint: str) -> TimedRunner:
    """What analyze() builds for one model, minus loading, data preparation and fingerprints."""
    nodes = resolve(list(metrics), {}, registry)
    shape = RunShape(batch_size=config.batch_size, seq_len=data.max_seq_len, n_batches=data.n_batches(),
                     n_sequences=data.n_sequences, tasks=tuple(data.tasks), seed=config.seed,
                     batches=data.batch_layout())
    plan = make_plan(nodes, view, shape, registry, config.budget().nbytes, config.min_micro_batch)
    if plan.micro_batch != config.batch_size:
        raise RuntimeError(f"the plan micro-batches ({plan.micro_batch} < {config.batch_size}); "
                           "raise the bench memory budget so timings compare whole batches")
    return TimedRunner(view=view, data=data, nodes=nodes, plan=plan, shape=shape, registry=registry,
                       config=config, cache=None, data_fingerprint=data_fingerprint,
                       model_fingerprint=model_fingerprint, counter=PassCounter([type(view.model)]))


@dataclass
class RunOutcome:
    """One timed variant of one repetition."""

    total: Clock
    data_pass: Clock | None = None
    runner: TimedRunner | None = None
    derive: dict[str, float] = field(default_factory=dict)

    @property
    def ran(self) -> TimedRunner:
        assert self.runner is not None, "a bare loop has no runner"
        return self.runner

    @property
    def pass_clock(self) -> Clock:
        assert self.data_pass is not None, "a bare loop has no data pass"
        return self.data_pass


def run_ours(make: Callable[[], TimedRunner], seed: int) -> RunOutcome:
    runner = make()
    gc.collect()
    DERIVE_SECONDS.clear()
    torch.manual_seed(seed)  # as analyze() does before each model
    total = Clock()
    with timed(total):
        runner.run()
    return RunOutcome(total, runner.data_pass, runner, dict(DERIVE_SECONDS))


# -- the bare loops the overhead is measured against ------------------------------------------


def bare_forward_backward(model: torch.nn.Module, data: PreparedData) -> RunOutcome:
    """model(input_ids, labels=input_ids).loss.backward() per batch, gradients dropped per batch
    (the runner also zeroes them per batch), same batches, eager attention, eval mode."""
    gc.collect()
    total = Clock()
    with timed(total):
        for batch in data.batches():
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        labels=batch.input_ids, use_cache=False)
            out.loss.backward()
            model.zero_grad(set_to_none=True)
    return RunOutcome(total)


def bare_forward(model: torch.nn.Module, data: PreparedData) -> RunOutcome:
    """A forward without gradients per batch: what a forward-only pass of the runner costs at least."""
    gc.collect()
    total = Clock()
    with timed(total), torch.no_grad():
        for batch in data.batches():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return RunOutcome(total)


# -- statistics over repetitions ---------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median and min-max of per-repetition ratios."""
    vals = [float(v) for v in values]
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals),
            "values": [round(v, 4) for v in vals]}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with aligned columns."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells[1:]]
    return "\n".join(out)


def probe_plugin(probes: dict[str, Sequence[str]]) -> Any:
    """A bench-only plugin of metrics that ask for artifacts and compute nothing ({name: artifacts}):
    one asks for every data artifact (so each one's declared bytes can be checked against what a run
    held), one for what the basic metrics read (so the core's capture cost is timed without them)."""
    from tensorscope_core.plugins import plugin_module

    def make(metric_name: str, wanted: Sequence[str]) -> type[Metric]:
        class Probe(Metric):
            """Asks for artifacts; computes nothing."""

            name = metric_name
            version = "1"
            summary = "bench: request artifacts, compute nothing"
            artifacts = tuple(wanted)

            def finalize(self) -> dict[str, float]:
                return {}

        return Probe

    classes = [make(n, a) for n, a in probes.items()]

    def register_metrics(register: Callable[[type], None]) -> None:
        for cls in classes:
            register(cls)

    return plugin_module("bench_probe", register_metrics=register_metrics)


# -- printing ----------------------------------------------------------------------------------


def ratio_str(s: dict[str, Any], digits: int = 3) -> str:
    """A ratio summary (``spread``) as ``median [min-max]``."""
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("MET" if ok else "MISSED")


# -- the command line every side-by-side benchmark script shares --------------------------------


def bench_main(doc: str | None, quick_help: str, sizes: tuple[Any, Any], bench: Callable[[Any, str], dict[str, Any]],
               print_report: Callable[[dict[str, Any]], None], argv: Sequence[str] | None = None,
               default_out: Any = None) -> int:
    """``--quick --threads --clock --reps --out`` for a benchmark ``bench(size, clock)``: ``sizes`` is
    (quick, full), dataclasses with a ``reps`` field. Adds the date, threads, machine and total
    seconds to the report, prints it and writes it as JSON to ``--out`` when one is given."""
    import argparse
    import datetime as dt
    import json
    import os
    import platform
    from pathlib import Path

    import transformers

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default=None,
                        help="clock of the verdict (default: process CPU time with 1 thread, else wall)")
    parser.add_argument("--reps", type=int, default=None, help="interleaved repetitions")
    parser.add_argument("--out", type=Path, default=default_out, help="write the report as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    primary = args.clock or ("cpu" if args.threads == 1 else "wall")
    size = sizes[0] if args.quick else sizes[1]
    if args.reps:
        size = dataclasses.replace(size, reps=args.reps)
    started = time.perf_counter()
    report = bench(size, primary)
    report.update({"date": dt.date.today().isoformat(), "threads": args.threads,
                   "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                               "python": platform.python_version(), "torch": torch.__version__,
                               "transformers": transformers.__version__},
                   "seconds_total": round(time.perf_counter() - started, 1)})
    print_report(report)
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"\nresults written to {args.out}")
    print(f"bench took {report['seconds_total']} s")
    return 0
