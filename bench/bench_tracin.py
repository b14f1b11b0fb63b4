"""gradients.tracin against Captum's TracInCP: the same model, checkpoints and examples.

    python bench/bench_tracin.py [--quick] [--threads N] [--reps R] [--clock cpu|wall] [--out PATH]
    python bench/run.py            # runs this after the capture benchmarks (--skip-tracin leaves it out)

Captum is a bench-only dependency (`pip install captum==0.9.0`, in the nox bench session);
without it this benchmark reports itself as skipped.

Both sides compute TracInCP over the same three GPT-2 checkpoints saved with
``save_pretrained``, with the same learning rates, on the same token ids (no padding):

    influence(z, z') = sum_c eta_c grad_theta l_c(z) . grad_theta l_c(z')

over *all* parameters (the tied embedding / head counted once, as ``model.parameters()``
and ``named_parameters()`` both give it), with l(z) the mean next-token cross-entropy of
example z over its L - 1 targets. Ours: ``analyze(checkpoint folders, {"train", "test"},
["gradients.tracin"], learning_rates=...)`` end to end (loading and checking each checkpoint,
fingerprints, the shared run, per-example gradients by ``torch.func``, self-influence and
the proponent / opponent tables besides the influence matrix). Captum: building the model
from the first folder, ``TracInCP(model, TensorDataset(train, train), checkpoint files,
load function returning each rate, loss_fn=per-example mean token loss,
sample_wise_grads_per_batch=False)`` and ``.influence((test, test))``, which reloads each
checkpoint's safetensors file for the test batch and for every training batch. Captum's
per-example gradients are ``autograd.grad`` of each example's loss in turn; its per-batch
hook trick (``sample_wise_grads_per_batch=True``) supports only ``nn.Linear`` / ``Conv2d``
layers, not GPT-2's ``Conv1D``, so it does not apply here.

Captum is timed at training batch size 1 (its fastest here: each ``autograd.grad`` call
backpropagates through the whole batch's graph, so its cost grows with the batch size) and at
our batch size; the goal compares ours with its fastest. Scores are compared in float32 (the
timed runs) and, on a subset, in float64 (the definitions agree to rounding).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import sys
import tempfile
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
GOAL = 1.0  # ours / Captum's time
AGREEMENT = 1e-5  # max |ours - Captum| / max |Captum| (float32 timed runs)
TRACIN = "gradients.tracin"
TERMS = "gradients.tracin_terms"
LEARNING_RATES = (1e-3, 5e-4, 2.5e-4)
STEPS = (100, 200, 300)


@dataclass(frozen=True)
class TracInSize:
    quick: bool
    n_layers: int
    d_model: int
    n_heads: int
    vocab_size: int
    n_train: int
    n_test: int
    seq_len: int
    batch_size: int
    reps: int
    check64_train: int  # examples of the float64 agreement check
    check64_test: int


FULL = TracInSize(quick=False, n_layers=4, d_model=256, n_heads=4, vocab_size=8192, n_train=64, n_test=16,
                  seq_len=64, batch_size=8, reps=3, check64_train=16, check64_test=4)
QUICK = TracInSize(quick=True, n_layers=2, d_model=64, n_heads=4, vocab_size=2048, n_train=16, n_test=4,
                   seq_len=32, batch_size=8, reps=3, check64_train=8, check64_test=4)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def captum_version() -> str | None:
    try:
        import captum
    except ImportError:
        return None
    return str(captum.__version__)


# -- the shared inputs: checkpoints on disk and token ids ----------------------------------------


def make_checkpoints(size: TracInSize, root: Path, seed: int = 0) -> tuple[list[Path], Any]:
    """Three GPT-2 checkpoints (random init, then perturbed before each save, as training would
    move it) in root/checkpoint-<step>/, saved with save_pretrained (safetensors). Returns the
    folders and the model's description."""
    from bench_models import describe
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=size.n_layers, n_embd=size.d_model, n_head=size.n_heads,
                        vocab_size=size.vocab_size, n_positions=max(256, size.seq_len),
                        attn_implementation="eager")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    folders = []
    for step in STEPS:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
        folder = root / f"checkpoint-{step}"
        model.save_pretrained(folder)
        folders.append(folder)
    return folders, describe(model)


def token_ids(size: TracInSize, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, size.vocab_size, (size.n_train + size.n_test, size.seq_len), generator=gen)
    return ids[:size.n_train], ids[size.n_train:]


# -- the two sides -------------------------------------------------------------------------------


def ours(folders: Sequence[Path], train: torch.Tensor, test: torch.Tensor, size: TracInSize,
         dtype: str = "float32") -> tuple[torch.Tensor, dict[str, Any]]:
    """TensorScope end to end: influence [n_train, n_test] and where its time went."""
    res = analyze({f"checkpoint-{s}": str(f) for s, f in zip(STEPS, folders, strict=True)},
                  data={"train": train, "test": test}, metrics=[TRACIN],
                  params={TRACIN: {"learning_rates": list(LEARNING_RATES)}},
                  config=RunConfig(batch_size=size.batch_size, max_length=size.seq_len, dtype=dtype,
                                   memory_budget="64GiB"))
    result = res.get(TRACIN)
    if not result.ok:
        raise RuntimeError(f"{TRACIN} {result.status}: {result.reason}")
    terms = [m.metrics[TERMS] for m in res.record.models]
    info = {"seconds_total": res.record.seconds_total,
            "tracin_terms_seconds": round(sum(t.seconds or 0.0 for t in terms), 4),
            "tracin_seconds": result.seconds,
            "passes": [dict(m.passes) for m in res.record.models]}
    return res.tensor(TRACIN, "influence"), info


class PerExampleLoss(torch.nn.Module):
    """Captum's loss_fn: each example's mean next-token cross-entropy over its L - 1 targets
    (no padding in this data), i.e. the per-example loss gradients.tracin differentiates."""

    reduction = "none"  # a per-example loss, as TracInCP requires with sample_wise_grads_per_batch=False

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               labels[:, 1:].reshape(-1), reduction="none")
        return ce.view(labels.shape[0], -1).mean(dim=1)


class LogitsOf(torch.nn.Module):
    """What Captum calls: model(input_ids) -> logits (it passes batch[:-1] and gives batch[-1] to loss_fn)."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits


def captum(folders: Sequence[Path], train: torch.Tensor, test: torch.Tensor, batch_size: int,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Captum's TracInCP end to end: influence [n_train, n_test] (it returns [n_test, n_train])."""
    from captum.influence import TracInCP
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    rates = {str(f / "model.safetensors"): lr for f, lr in zip(folders, LEARNING_RATES, strict=True)}
    lm = GPT2LMHeadModel.from_pretrained(folders[0], attn_implementation="eager").to(dtype).eval()
    model = LogitsOf(lm).eval()

    def load(module: torch.nn.Module, path: str) -> float:
        missing, unexpected = module.lm.load_state_dict(load_file(path), strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # the tied head is saved once, as the embedding
            raise RuntimeError(f"checkpoint {path}: missing {missing}, unexpected {unexpected}")
        return rates[path]

    tracin = TracInCP(model, torch.utils.data.TensorDataset(train, train), checkpoints=list(rates),
                      checkpoints_load_func=load, loss_fn=PerExampleLoss(), batch_size=batch_size,
                      sample_wise_grads_per_batch=False)
    scores = tracin.influence((test, test))
    assert isinstance(scores, torch.Tensor)
    return scores.T


# -- agreement and timing ------------------------------------------------------------------------


def agreement(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    got, ref = got.double(), ref.double()
    diff = (got - ref).abs()
    scale = float(ref.abs().max())
    return {"max_abs_diff": float(diff.max()), "max_abs_value": scale,
            "max_diff_over_max_value": float(diff.max()) / scale if scale > 0 else float("nan"),
            "median_elementwise_rel_diff": float((diff / ref.abs().clamp(min=1e-300)).median())}


def bench(size: TracInSize, primary: str = "cpu") -> dict[str, Any]:
    """The benchmark; returns its report (see print_tracin)."""
    version = captum_version()
    if version is None:
        return {"skipped": "captum is not installed: pip install captum==0.9.0 (the nox bench session installs it)"}
    with tempfile.TemporaryDirectory(prefix="tracin-bench-") as tmp:
        log("[tracin] writing 3 checkpoints")
        folders, info = make_checkpoints(size, Path(tmp))
        train, test = token_ids(size)

        log("[tracin] float64 agreement check (untimed subset)")
        sub_train, sub_test = train[:size.check64_train], test[:size.check64_test]
        ours64, _ = ours(folders, sub_train, sub_test, size, dtype="float64")
        captum64 = captum(folders, sub_train, sub_test, 1, dtype=torch.float64)
        check64 = agreement(ours64, captum64)

        variants: list[tuple[str, Callable[[], Any]]] = [
            ("ours", lambda: ours(folders, train, test, size)),
            ("captum_batch_1", lambda: (captum(folders, train, test, 1), None)),
            (f"captum_batch_{size.batch_size}", lambda: (captum(folders, train, test, size.batch_size), None)),
        ]
        same_batch = f"captum_batch_{size.batch_size}"
        log("[tracin] warm-up")
        ours(folders, train[:2], test[:1], size)
        captum(folders, train[:2], test[:1], 1)
        clocks: dict[str, list[Clock]] = {k: [] for k, _ in variants}
        scores: dict[str, torch.Tensor] = {}
        ours_info: list[dict[str, Any]] = []
        for rep in range(size.reps):
            order = variants if rep % 2 == 0 else variants[::-1]
            for key, fn in order:
                gc.collect()
                clock = Clock()
                with timed(clock):
                    out, extra = fn()
                clocks[key].append(clock)
                scores.setdefault(key, out)
                if extra is not None:
                    ours_info.append(extra)
            log(f"[tracin] repetition {rep + 1}/{size.reps}: " + ", ".join(
                f"{k} {clocks[k][-1].cpu:.1f} s CPU" for k, _ in variants))
        reference = ours(folders, train, test, size, dtype="float64")[0]  # float64: who is closer to exact

    def ratios(denominator: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for which in ("cpu", "wall"):
            values = [getattr(a, which) / getattr(b, which)
                      for a, b in zip(clocks["ours"], clocks[denominator], strict=True)]
            out[which] = spread(values)
            out[which]["met"] = out[which]["median"] <= GOAL
        out["met"] = out[primary]["met"]
        return out

    agree32 = agreement(scores["ours"], scores["captum_batch_1"])
    report: dict[str, Any] = {
        "captum": version, "model": info, "settings": dataclasses.asdict(size), "primary_clock": primary,
        "learning_rates": list(LEARNING_RATES), "goal": GOAL, "agreement_goal": AGREEMENT,
        "seconds": {k: {"cpu": [round(c.cpu, 4) for c in v], "wall": [round(c.wall, 4) for c in v]}
                    for k, v in clocks.items()},
        "ratio_vs_captum_batch_1": ratios("captum_batch_1"),
        "ratio_vs_captum_same_batch": ratios(same_batch),
        "agreement_float32": agree32,
        "agreement_float32_same_batch": agreement(scores["ours"], scores[same_batch]),
        "agreement_float64_subset": check64,
        "error_vs_float64": {"ours": agreement(scores["ours"], reference),
                             "captum_batch_1": agreement(scores["captum_batch_1"], reference)},
        "ours_breakdown": {k: statistics.median(float(i[k] or 0.0) for i in ours_info)
                           for k in ("seconds_total", "tracin_terms_seconds", "tracin_seconds")},
        "ours_passes": ours_info[0]["passes"] if ours_info else None,
    }
    report["agreement_met"] = agree32["max_diff_over_max_value"] <= AGREEMENT
    report["met"] = report["ratio_vs_captum_batch_1"]["met"]
    return report


# -- printing ------------------------------------------------------------------------------------


def print_tracin(report: dict[str, Any]) -> None:
    if "skipped" in report:
        print(f"\ngradients.tracin vs Captum TracInCP: skipped ({report['skipped']})")
        return
    s, m = report["settings"], report["model"]
    primary = report["primary_clock"]
    other = "wall" if primary == "cpu" else "cpu"
    print(f"\ngradients.tracin vs Captum {report['captum']} TracInCP ({'quick' if s['quick'] else 'full'}): "
          f"GPT2LMHeadModel {s['n_layers']} layers, d {s['d_model']}, vocab {s['vocab_size']}, "
          f"{m['n_params'] / 1e6:.2f} M parameters (all differentiated), 3 checkpoints, "
          f"{s['n_train']} train x {s['n_test']} test examples of {s['seq_len']} tokens, our batch "
          f"{s['batch_size']}, {s['reps']} interleaved repetitions")

    rows = []
    for key, label in (("ratio_vs_captum_batch_1", "ours / Captum at batch 1"),
                       ("ratio_vs_captum_same_batch", f"ours / Captum at batch {s['batch_size']}")):
        r = report[key]
        rows.append([label, ratio_str(r[primary]), ratio_str(r[other]), f"<= {report['goal']}",
                     f"{verdict(r['met'])} ({verdict(r[other]['met'])})" if key == "ratio_vs_captum_batch_1" else ""])
    print(table(["time ratio", primary, other, "goal", f"verdict {primary} ({other})"], rows))
    a32, a64 = report["agreement_float32"], report["agreement_float64_subset"]
    print(f"  influence agreement, float32 (all pairs): max |ours - Captum| = {a32['max_abs_diff']:.3e}, "
          f"{a32['max_diff_over_max_value']:.2e} of max |influence| {a32['max_abs_value']:.3e} "
          f"(goal <= {report['agreement_goal']:g}: {verdict(report['agreement_met'])})")
    print(f"  float64 ({s['check64_train']} x {s['check64_test']} subset): "
          f"{a64['max_diff_over_max_value']:.2e} of max |influence|")
    err = report["error_vs_float64"]
    print(f"  float32 error against our float64 run: ours {err['ours']['max_diff_over_max_value']:.2e}, "
          f"Captum {err['captum_batch_1']['max_diff_over_max_value']:.2e} (of max |influence|)")
    med = {k: statistics.median(v["cpu"]) for k, v in report["seconds"].items()}
    b = report["ours_breakdown"]
    print("  median CPU seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in med.items())
          + f"; ours: analyze() {b['seconds_total']:.2f} s wall, of which gradients.tracin_terms' own "
          f"update + finalize (keeping the gradients, norms, dot products) {b['tracin_terms_seconds']:.2f} s and "
          f"gradients.tracin {b['tracin_seconds']:.3f} s; the rest is loading and checking the checkpoints "
          "and the shared data pass (forward, per-example gradients by torch.func)")


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(__doc__, "2-layer d=64 model, 16 x 4 examples (a smoke run)",
                      (QUICK, FULL), bench, print_tracin, argv, default_out=HERE / "results-tracin.json")


if __name__ == "__main__":
    sys.exit(main())
