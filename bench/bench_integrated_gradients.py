"""circuits.integrated_gradients against Captum's LayerIntegratedGradients on the token embeddings.

    python bench/bench_integrated_gradients.py [--quick] [--threads N] [--reps R] [--clock cpu|wall] [--out PATH]

Captum is a bench-only dependency (`pip install captum==0.9.0`); without it this benchmark
reports itself as skipped.

Both sides attribute the same F to the output of the same GPT-2's token embedding
(``transformer.wte``), on the same token ids (no padding), from the same baseline (the
embedding of token 0, the model's pad id: Captum's baselines are token ids), with the same
rule (Gauss-Legendre), steps and evaluation chunks:

    F(x) = the example's mean next-token cross-entropy over its L - 1 targets,
    IG_t = (x_t - x'_t) . sum_k w_k grad_{x_t} F(x' + a_k (x - x')), summed over the embedding.

The targets reach Captum's forward as an additional argument, so its convergence delta (F
at the baseline ids) scores the same next tokens as our completeness error.

Ours end to end: ``analyze(model, ids, ["circuits.integrated_gradients"], baseline="pad")``
(view, finiteness check, fingerprint, the shared forward pass, whose loss is F(x), then the
metric: one forward for F(x'), the path in chunks of ``chunk`` nodes x the batch; GPT-2 is
causal and its last position has no target, so the metric's forwards leave that column out,
and its attribution is exactly 0, as Captum's gradient there is). Captum:
``LayerIntegratedGradients(forward_func, model.transformer.wte).attribute(ids, baselines=0,
n_steps=steps, method="gausslegendre", internal_batch_size=chunk x batch,
return_convergence_delta=True)`` (the convergence delta is what our completeness error reports;
Captum runs four forwards of the batch besides the path: the layer's output at the input and
at the baseline, and F at both ends), summed over the embedding. A third variant times the
computation alone: the plugin's ``integrated_gradients`` function on the model's view with the
metric's objective and extent, without ``analyze`` (so without its loading checks,
fingerprints and shared forward pass).

Time: interleaved repetitions, ratio ours / Captum per repetition (median, min-max), process
CPU time with one thread. Peak memory: each side once more under ``torch.profiler`` with
``profile_memory``: the most tensor bytes alive at once during the call beyond those alive
before it (the running sum of the CPU allocator's events), which is deterministic; the
resident set of the process, tried first, moved by +-20 MiB between identical runs.
Agreement: max |ours - Captum| / max |Captum| over all token attributions, float32 (the timed
runs) and float64 (Captum casts its quadrature weights to float32, so float64 agrees to ~1e-9).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from bench_measure import Clock, bench_main, ratio_str, spread, table, timed, verdict  # noqa: E402

from tensorscope_core import RunConfig, analyze  # noqa: E402

HERE = Path(__file__).resolve().parent
METRIC = "circuits.integrated_gradients"
TIME_GOAL = 1.0  # ours / Captum
MEMORY_GOAL = 1.0
AGREEMENT = 1e-5  # max |ours - Captum| / max |Captum|


@dataclass(frozen=True)
class IGSize:
    quick: bool
    n_layers: int
    d_model: int
    n_heads: int
    vocab_size: int
    batch_size: int
    seq_len: int
    steps: int
    chunk: int
    reps: int


FULL = IGSize(quick=False, n_layers=6, d_model=512, n_heads=8, vocab_size=16384, batch_size=2, seq_len=32,
              steps=32, chunk=8, reps=3)
QUICK = IGSize(quick=True, n_layers=2, d_model=64, n_heads=4, vocab_size=1024, batch_size=2, seq_len=16,
               steps=16, chunk=4, reps=3)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def captum_version() -> str | None:
    try:
        import captum
    except ImportError:
        return None
    return str(captum.__version__)


def make_model(size: IGSize, dtype: torch.dtype = torch.float32) -> Any:
    """A random GPT-2 of ``size`` (seeded, eager attention, eval mode)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=size.n_layers, n_embd=size.d_model, n_head=size.n_heads, vocab_size=size.vocab_size,
                        n_positions=max(64, size.seq_len), attn_implementation="eager")
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(dtype).eval()


def token_ids(size: IGSize) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(1, size.vocab_size, (size.batch_size, size.seq_len), generator=gen)


# -- the two sides -------------------------------------------------------------------------------


def ours(model: Any, ids: torch.Tensor, size: IGSize, dtype: str = "float32") -> tuple[torch.Tensor, dict[str, Any]]:
    """TensorScope end to end: attributions [batch, seq] and the metric's own seconds."""
    params = {"baseline": "pad", "steps": size.steps, "rule": "gausslegendre", "chunk": size.chunk}
    res = analyze(model, data=ids, metrics=[METRIC], params={METRIC: params},
                  config=RunConfig(batch_size=size.batch_size, max_length=size.seq_len, dtype=dtype,
                                   memory_budget="64GiB"))
    result = res.get(METRIC)
    if not result.ok:
        raise RuntimeError(f"{METRIC} {result.status}: {result.reason}")
    return res.tensor(METRIC, "attributions"), {"metric_seconds": result.seconds,
                                                "seconds_total": res.record.seconds_total,
                                                "completeness_error": result.value("completeness_error")}


def ours_function(model: Any, ids: torch.Tensor, size: IGSize) -> tuple[torch.Tensor, dict[str, Any]]:
    """The computation alone: the plugin's ``integrated_gradients`` on the model's view, with the
    metric's objective and baseline (what the metric's ``update`` runs), without ``analyze``."""
    from tensorscope_circuits.ig import integrated_gradients, mean_token_loss, scored_extent

    from tensorscope_core.models.load import ModelSource, load_model
    from tensorscope_core.plugins import get_registry

    view = load_model(ModelSource(model), get_registry().adapters)
    target_ids, target_mask = torch.zeros_like(ids), torch.ones_like(ids)
    target_ids[:, :-1], target_mask[:, -1] = ids[:, 1:], 0
    baseline = view.embed.weight[view.pad_token_id].detach().expand(*ids.shape, view.d_model)
    result = integrated_gradients(view, ids, torch.ones_like(ids), baseline, mean_token_loss(target_ids, target_mask),
                                  steps=size.steps, rule="gausslegendre", chunk=size.chunk,
                                  reads=scored_extent(target_mask))
    return result.attributions, {"completeness_error": float(result.completeness_error.abs().max())}


def captum(model: Any, ids: torch.Tensor, size: IGSize) -> tuple[torch.Tensor, dict[str, Any]]:
    """Captum's LayerIntegratedGradients on the token embedding: attributions [batch, seq]."""
    from captum.attr import LayerIntegratedGradients

    def mean_token_loss(input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=input_ids, use_cache=False).logits
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               targets[:, 1:].reshape(-1), reduction="none")
        return ce.view(input_ids.shape[0], -1).mean(dim=1)

    # the targets travel as an additional argument (Captum repeats it per node), so F at the
    # baseline ids still scores the input's next tokens, as ours does
    lig = LayerIntegratedGradients(mean_token_loss, model.transformer.wte)
    attributions, delta = lig.attribute(ids, baselines=torch.zeros_like(ids), additional_forward_args=(ids,),
                                        n_steps=size.steps, method="gausslegendre",
                                        internal_batch_size=size.chunk * size.batch_size,
                                        return_convergence_delta=True)
    return attributions.sum(-1).detach(), {"convergence_delta": float(delta.abs().max())}


SIDES: dict[str, Callable[[Any, torch.Tensor, IGSize], tuple[torch.Tensor, dict[str, Any]]]] = {
    "ours": ours, "ours_function": ours_function, "captum": captum}


# -- peak memory: torch's own allocation events ------------------------------------------------


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Most tensor bytes alive at once during ``fn()`` beyond those alive before it: the running
    sum of the allocations and frees that ``torch.profiler`` records (CPU allocator events, in
    time order). Deterministic, unlike the resident set, and blind to Python objects."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


# -- agreement and the run ----------------------------------------------------------------------


def agreement(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    diff = (got.double() - ref.double()).abs()
    scale = float(ref.abs().max())
    return {"max_abs_diff": float(diff.max()), "max_abs_value": scale,
            "max_diff_over_max_value": float(diff.max()) / scale if scale > 0 else float("nan")}


def bench(size: IGSize, primary: str) -> dict[str, Any]:
    version = captum_version()
    if version is None:
        return {"skipped": "captum is not installed: pip install captum==0.9.0 (bench only)"}
    model, ids = make_model(size), token_ids(size)
    log("[ig] float64 agreement check")
    model64 = make_model(size, torch.float64)
    check64 = agreement(ours(model64, ids, size, dtype="float64")[0], captum(model64, ids, size)[0])
    del model64
    log("[ig] warm-up")
    for fn in SIDES.values():
        fn(model, ids[:1], dataclasses.replace(size, steps=2, chunk=1))
    clocks: dict[str, list[Clock]] = {k: [] for k in SIDES}
    outputs: dict[str, tuple[torch.Tensor, dict[str, Any]]] = {}
    infos: list[dict[str, Any]] = []
    for rep in range(size.reps):
        order = list(SIDES.items()) if rep % 2 == 0 else list(SIDES.items())[::-1]
        for key, fn in order:
            gc.collect()
            clock = Clock()
            with timed(clock):
                out = fn(model, ids, size)
            clocks[key].append(clock)
            outputs.setdefault(key, out)
            if key == "ours":
                infos.append(out[1])
        log(f"[ig] repetition {rep + 1}/{size.reps}: " + ", ".join(
            f"{k} {clocks[k][-1].cpu:.2f} s CPU" for k in SIDES))
    log("[ig] peak memory (torch.profiler allocation events)")
    memory = {key: {"peak_extra_bytes": peak_bytes(lambda fn=fn: fn(model, ids, size))} for key, fn in SIDES.items()}

    def ratio(numerator: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for which in ("cpu", "wall"):
            values = [getattr(a, which) / getattr(b, which)
                      for a, b in zip(clocks[numerator], clocks["captum"], strict=True)]
            out[which] = spread(values)
            out[which]["met"] = out[which]["median"] <= TIME_GOAL
        return out

    time_ratio, function_ratio = ratio("ours"), ratio("ours_function")
    memory_ratio = memory["ours"]["peak_extra_bytes"] / max(memory["captum"]["peak_extra_bytes"], 1)
    agree32 = agreement(outputs["ours"][0], outputs["captum"][0])
    from bench_models import describe

    return {
        "captum": version, "model": describe(model), "settings": dataclasses.asdict(size), "primary_clock": primary,
        "goals": {"time": TIME_GOAL, "memory": MEMORY_GOAL, "agreement": AGREEMENT},
        "seconds": {k: {"cpu": [round(c.cpu, 4) for c in v], "wall": [round(c.wall, 4) for c in v]}
                    for k, v in clocks.items()},
        "time_ratio": time_ratio, "function_time_ratio": function_ratio, "memory": memory, "memory_ratio": memory_ratio,
        "agreement_float32": agree32, "agreement_float64": check64,
        "completeness": {"ours_completeness_error": outputs["ours"][1]["completeness_error"],
                         "captum_convergence_delta": outputs["captum"][1]["convergence_delta"]},
        "ours_metric_seconds": [i["metric_seconds"] for i in infos],
        "ours_analyze_seconds": [i["seconds_total"] for i in infos],
        "time_met": time_ratio[primary]["met"], "memory_met": memory_ratio <= MEMORY_GOAL,
        "agreement_met": agree32["max_diff_over_max_value"] <= AGREEMENT,
    }


def print_report(report: dict[str, Any]) -> None:
    if "skipped" in report:
        print(f"\ncircuits.integrated_gradients vs Captum: skipped ({report['skipped']})")
        return
    s, m = report["settings"], report["model"]
    primary = report["primary_clock"]
    other = "wall" if primary == "cpu" else "cpu"
    print(f"\ncircuits.integrated_gradients vs Captum {report['captum']} LayerIntegratedGradients "
          f"({'quick' if s['quick'] else 'full'}): GPT2LMHeadModel {s['n_layers']} layers, d {s['d_model']}, "
          f"vocab {s['vocab_size']}, {m['n_params'] / 1e6:.1f} M parameters; {s['batch_size']} x {s['seq_len']} "
          f"tokens, {s['steps']} Gauss-Legendre steps in chunks of {s['chunk']}, pad-token baseline, "
          f"{s['reps']} interleaved repetitions")

    t, f, mem = report["time_ratio"], report["function_time_ratio"], report["memory"]
    rows = [["time ours (analyze) / Captum", ratio_str(t[primary]), ratio_str(t[other]),
             f"<= {report['goals']['time']}",
             f"{verdict(t[primary]['met'])} ({verdict(t[other]['met'])})"],
            ["time ours (the computation) / Captum", ratio_str(f[primary]), ratio_str(f[other]), "", ""],
            ["peak tensor memory ours / Captum", f"{report['memory_ratio']:.6f}",
             f"{mem['ours']['peak_extra_bytes'] / 2**20:.1f} / {mem['captum']['peak_extra_bytes'] / 2**20:.1f} MiB "
             f"({mem['ours']['peak_extra_bytes'] - mem['captum']['peak_extra_bytes']:+d} B)",
             f"<= {report['goals']['memory']}", verdict(report["memory_met"])]]
    print(table(["ratio", primary, f"{other} / detail", "goal", "verdict"], rows))
    a32, a64 = report["agreement_float32"], report["agreement_float64"]
    print(f"  attributions: max |ours - Captum| / max |Captum| = {a32['max_diff_over_max_value']:.2e} in float32 "
          f"(goal <= {report['goals']['agreement']:g}: {verdict(report['agreement_met'])}), "
          f"{a64['max_diff_over_max_value']:.2e} in float64")
    c = report["completeness"]
    print(f"  completeness: ours max |sum IG - dF| = {c['ours_completeness_error']:.3e}, Captum max |delta| = "
          f"{c['captum_convergence_delta']:.3e}; ours: metric {min(report['ours_metric_seconds']):.2f} s of "
          f"analyze() {min(report['ours_analyze_seconds']):.2f} s wall (best repetition)")


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(__doc__, "2-layer d=64 model, 16 steps (a smoke run)",
                      (QUICK, FULL), bench, print_report, argv)


if __name__ == "__main__":
    sys.exit(main())
