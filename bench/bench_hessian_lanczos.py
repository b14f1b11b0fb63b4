"""hessian.lanczos against curvlinops' HessianLinearOperator with scipy's eigsh: the top 10 eigenvalues
of the same loss Hessian, on the same model, batch and tolerance.

    python bench/bench_hessian_lanczos.py [--quick] [--threads N] [--reps R] [--clock cpu|wall] [--out PATH]

curvlinops is a bench-only dependency (``curvlinops-for-pytorch==3.0.1``; install it with
``--no-deps`` next to its pure-Python dependencies, or pip upgrades torch); without it this
benchmark reports itself as skipped.

The loss is the mean next-token cross-entropy over all target tokens of one batch of
sequences without padding (``hessian.lanczos`` with ``per='token'``: ``basic.loss``'s loss), in
float64, over every parameter of a GPT-2 (the tied embedding / head once). Ours:
``analyze(folder, data, ["hessian.lanczos"], k=10, tol=TOL)`` end to end (loading and checking
the model, fingerprint, the shared forward pass, then Lanczos with selective
reorthogonalisation on Hessian-vector products through the batch's first-order graph, kept
(reverse-over-reverse, the metric's default ``products='kept-graph'``), and the true residual
``||H v - lambda v||`` of each pair from the stored products). curvlinops:
``HessianLinearOperator(model, CrossEntropyLoss(), params, [(ids, labels)],
check_deterministic=False).to_scipy()`` on the model already in memory, then
``eigsh(k=10, which='LA', tol=TOL)`` (ARPACK, implicitly restarted Lanczos with full
reorthogonalisation; ``ncv`` its default 2k + 1). Both start from a seeded random vector.
Eigenvalues are compared relative to the largest; the products are counted on both sides.

Exactness (untimed): one Hessian-vector product of each side against reverse-over-reverse
``torch.autograd.functional.hvp`` on a random vector, and the eigenvalues of both against
``eigsh`` on that double-backward operator (tol 1e-10). With torch 2.13 curvlinops 3.0.1's
products differ from double backward by ~1% on this model: it differentiates
``torch.func.jvp(torch.func.jacrev(loss))``, and forward-mode through ``jacrev`` gives wrong
values here, where ``jvp(grad(loss))`` (our ``products='recomputed'``) and our kept graph agree with
``torch.autograd.functional.hvp`` to rounding. So the
eigenvalue agreement with curvlinops is limited by its operator, and the exact reference is
the double-backward one.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_measure import Clock, bench_main, ratio_str, spread, table, timed  # noqa: E402

from tensorscope_core import RunConfig, analyze  # noqa: E402

HERE = Path(__file__).resolve().parent
GOAL = 1.0  # ours / curvlinops + eigsh time
AGREEMENT = 1e-6  # max |lambda_ours - lambda_ref| / lambda_max
METRIC = "hessian.lanczos"
K = 10
TOL = 1e-6


@dataclass(frozen=True)
class Size:
    quick: bool
    n_layers: int
    d_model: int
    n_heads: int
    vocab_size: int
    n_seqs: int
    seq_len: int
    reps: int


FULL = Size(quick=False, n_layers=2, d_model=128, n_heads=4, vocab_size=2048, n_seqs=8, seq_len=32, reps=3)
QUICK = Size(quick=True, n_layers=1, d_model=32, n_heads=2, vocab_size=256, n_seqs=4, seq_len=16, reps=2)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def curvlinops_version() -> str | None:
    try:
        from importlib.metadata import version

        import curvlinops  # noqa: F401
    except ImportError:
        return None
    return version("curvlinops-for-pytorch")


def make_model(size: Size, folder: Path) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=size.n_layers, n_embd=size.d_model, n_head=size.n_heads, vocab_size=size.vocab_size,
                        n_positions=max(64, size.seq_len), tie_word_embeddings=False,
                        attn_implementation="eager")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    return model.double()


def ours(folder: Path, ids: torch.Tensor) -> tuple[np.ndarray, dict[str, Any]]:
    res = analyze(str(folder), data=ids, metrics=[METRIC],
                  params={METRIC: {"k": K, "tol": TOL, "max_iter": 300, "per": "token", "max_examples": None}},
                  config=RunConfig(batch_size=ids.shape[0], max_length=ids.shape[1], dtype="float64",
                                   memory_budget="64GiB"))
    result = res.get(METRIC)
    if not result.ok:
        raise RuntimeError(f"{METRIC} {result.status}: {result.reason}")
    iterations = int(result.value("iterations"))
    return np.array(result.value("eigenvalues")), {
        "products": iterations, "iterations": iterations, "converged": bool(result.value("converged")),
        "max_residual": max(result.value("residual_norms")), "metric_seconds": result.seconds,
        "seconds_total": res.record.seconds_total}


class Logits(torch.nn.Module):
    """What curvlinops calls: ids -> the next-token logits of every target position [n (T-1), V]."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        z = self.lm(input_ids=ids, use_cache=False).logits[:, :-1]
        return z.reshape(-1, z.shape[-1])


def reference(model: Any, ids: torch.Tensor) -> tuple[np.ndarray, dict[str, Any]]:
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import eigsh

    wrapped = Logits(model).eval()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    op = HessianLinearOperator(wrapped, torch.nn.CrossEntropyLoss(), params, [(ids, ids[:, 1:].reshape(-1))],
                               check_deterministic=False).to_scipy()
    calls = [0]

    def counted(v: np.ndarray) -> np.ndarray:
        calls[0] += 1
        return op @ v

    from scipy.sparse.linalg import LinearOperator

    n = op.shape[0]
    v0 = np.random.default_rng(0).standard_normal(n)
    values = eigsh(LinearOperator((n, n), matvec=counted, dtype=np.float64), k=K, which="LA", tol=TOL, v0=v0,
                   return_eigenvectors=False)
    return np.sort(values)[::-1], {"products": calls[0]}


def autograd_operator(model: Any, ids: torch.Tensor) -> tuple[Any, Any]:
    """(scipy LinearOperator of double-backward HVPs, hvp(numpy vector)) for the same loss and parameters."""
    from scipy.sparse.linalg import LinearOperator
    from torch.func import functional_call

    wrapped = Logits(model).eval()
    names = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    primals = tuple(p.detach() for p in wrapped.parameters() if p.requires_grad)
    labels = ids[:, 1:].reshape(-1)

    def loss(*params: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(wrapped, dict(zip(names, params, strict=True)),
                                                                 (ids,)), labels)

    def hvp(v: np.ndarray) -> np.ndarray:
        parts = torch.split(torch.from_numpy(np.ascontiguousarray(v)).to(torch.float64), [p.numel() for p in primals])
        tangents = tuple(t.reshape(p.shape) for t, p in zip(parts, primals, strict=True))
        out = torch.autograd.functional.hvp(loss, primals, tangents)[1]
        return torch.cat([o.reshape(-1) for o in out]).numpy()

    n = sum(p.numel() for p in primals)
    return LinearOperator((n, n), matvec=hvp, dtype=np.float64), hvp


def exactness(model: Any, folder: Path, ids: torch.Tensor, values: dict[str, np.ndarray]) -> dict[str, Any]:
    """One product of each side and both sides' eigenvalues against double backward."""
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import eigsh
    from tensorscope_fisher.curvature import kept_graph_product

    from tensorscope_core.functional import hook_free_copy
    from tensorscope_core.models.load import ModelSource, load_model
    from tensorscope_core.plugins import get_registry

    op, hvp = autograd_operator(model, ids)
    v = np.random.default_rng(1).standard_normal(op.shape[0])
    exact = hvp(v)
    wrapped = Logits(model).eval()
    theirs = HessianLinearOperator(wrapped, torch.nn.CrossEntropyLoss(), list(wrapped.parameters()),
                                   [(ids, ids[:, 1:].reshape(-1))], check_deterministic=False).to_scipy() @ v
    view = load_model(ModelSource(folder), get_registry().adapters, dtype="float64")
    shadow = hook_free_copy(view)
    weights = {n: p.detach() for n, p in view.model.named_parameters()}

    def loss(w: dict[str, torch.Tensor]) -> torch.Tensor:
        z = torch.func.functional_call(shadow, w, args=(), kwargs={"input_ids": ids, "use_cache": False},
                                       strict=False).logits[:, :-1]
        return torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), ids[:, 1:].reshape(-1))

    parts = torch.split(torch.from_numpy(v), [w.numel() for w in weights.values()])
    tangent = {n: t.reshape(w.shape) for (n, w), t in zip(weights.items(), parts, strict=True)}
    ours_hv = torch.cat([x.reshape(-1) for x in kept_graph_product([loss], weights)(tangent).values()]).numpy()
    scale = float(np.abs(exact).max())
    reference = np.sort(eigsh(op, k=K, which="LA", tol=1e-10, v0=np.random.default_rng(0).standard_normal(
        op.shape[0]), return_eigenvectors=False))[::-1]
    top = float(np.abs(reference).max())
    return {"hvp_vs_double_backward": {"ours": float(np.abs(ours_hv - exact).max()) / scale,
                                       "curvlinops": float(np.abs(theirs - exact).max()) / scale},
            "eigenvalues_double_backward": reference.tolist(),
            "eigenvalues_vs_double_backward": {k: float(np.abs(x - reference).max()) / top
                                               for k, x in values.items()}}


def bench(size: Size, primary: str = "cpu") -> dict[str, Any]:
    version = curvlinops_version()
    if version is None:
        return {"skipped": "curvlinops is not installed: pip install --no-deps curvlinops-for-pytorch==3.0.1 "
                           "backpack-for-pytorch einops einconv unfoldNd linear_operator"}
    with tempfile.TemporaryDirectory(prefix="hessian-bench-") as tmp:
        folder = Path(tmp) / "gpt2"
        model = make_model(size, folder)
        n_params = sum(p.numel() for p in model.parameters())
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(4, size.vocab_size, (size.n_seqs, size.seq_len), generator=gen)
        log(f"[hessian] warm-up ({n_params / 1e6:.2f} M parameters)")
        small = ids[:1, :4]
        analyze(str(folder), data=small, metrics=[METRIC], params={METRIC: {"k": 1, "max_iter": 2}},
                config=RunConfig(dtype="float64"))
        clocks: dict[str, list[Clock]] = {"ours": [], "curvlinops": []}
        values: dict[str, np.ndarray] = {}
        infos: dict[str, dict[str, Any]] = {}
        sides = [("ours", lambda: ours(folder, ids)), ("curvlinops", lambda: reference(model, ids))]
        for rep in range(size.reps):
            for key, fn in sides if rep % 2 == 0 else sides[::-1]:
                gc.collect()
                clock = Clock()
                with timed(clock):
                    out, info = fn()
                clocks[key].append(clock)
                values.setdefault(key, out)
                infos.setdefault(key, info)
            log(f"[hessian] repetition {rep + 1}/{size.reps}: " + ", ".join(
                f"{k} {v[-1].cpu:.1f} s CPU" for k, v in clocks.items()))
        log("[hessian] exactness against double backward (untimed)")
        exact = exactness(model, folder, ids, values)

    ratios: dict[str, Any] = {}
    for which in ("cpu", "wall"):
        ratios[which] = spread([getattr(a, which) / getattr(b, which)
                                for a, b in zip(clocks["ours"], clocks["curvlinops"], strict=True)])
        ratios[which]["met"] = ratios[which]["median"] <= GOAL
    diff = np.abs(values["ours"] - values["curvlinops"])
    scale = float(np.abs(values["curvlinops"]).max())
    report: dict[str, Any] = {
        "curvlinops": version, "settings": dataclasses.asdict(size), "n_params": n_params, "k": K, "tol": TOL,
        "primary_clock": primary, "goal": GOAL, "agreement_goal": AGREEMENT,
        "seconds": {k: {"cpu": [round(c.cpu, 4) for c in v], "wall": [round(c.wall, 4) for c in v]}
                    for k, v in clocks.items()},
        "ratio": ratios, "eigenvalues": {k: v.tolist() for k, v in values.items()},
        "max_diff_over_lambda_max": float(diff.max()) / scale, "info": infos, "exactness": exact,
    }
    report["agreement_met"] = exact["eigenvalues_vs_double_backward"]["ours"] <= AGREEMENT
    report["met"] = ratios[primary]["met"]
    return report


def print_report(report: dict[str, Any]) -> None:
    if "skipped" in report:
        print(f"\nhessian.lanczos vs curvlinops + eigsh: skipped ({report['skipped']})")
        return
    s = report["settings"]
    primary = report["primary_clock"]
    other = "wall" if primary == "cpu" else "cpu"
    print(f"\nhessian.lanczos vs curvlinops {report['curvlinops']} HessianLinearOperator + scipy eigsh "
          f"({'quick' if s['quick'] else 'full'}): GPT2LMHeadModel {s['n_layers']} layers, d {s['d_model']}, "
          f"vocab {s['vocab_size']}, {report['n_params'] / 1e6:.2f} M parameters, float64, one batch of "
          f"{s['n_seqs']} x {s['seq_len']} tokens, top {report['k']}, tol {report['tol']:g}, "
          f"{s['reps']} interleaved repetitions")

    r = report["ratio"]
    print(table(["time ratio", primary, other, "goal", "verdict"],
                [["ours / curvlinops+eigsh", ratio_str(r[primary]), ratio_str(r[other]), f"<= {report['goal']}",
                  "MET" if report["met"] else "MISSED"]]))
    info = report["info"]
    ex = report["exactness"]
    e = ex["eigenvalues_vs_double_backward"]
    print(f"  eigenvalues: max |ours - curvlinops eigsh| / lambda_max = {report['max_diff_over_lambda_max']:.2e}; "
          f"against eigsh on double-backward HVPs: ours {e['ours']:.2e} (goal <= {report['agreement_goal']:g}: "
          f"{'MET' if report['agreement_met'] else 'MISSED'}), curvlinops {e['curvlinops']:.2e}; "
          f"lambda_max {ex['eigenvalues_double_backward'][0]:.6g}")
    h = ex["hvp_vs_double_backward"]
    print(f"  one Hessian-vector product against double backward (max diff / max |Hv|): ours {h['ours']:.1e}, "
          f"curvlinops {h['curvlinops']:.1e}")
    print(f"  Hessian-vector products: ours {info['ours']['products']} (Lanczos iterations, "
          f"converged {info['ours']['converged']}, max residual "
          f"{info['ours']['max_residual']:.1e}), eigsh {info['curvlinops']['products']}; ours: analyze() "
          f"{info['ours']['seconds_total']:.2f} s wall, of which the metric {info['ours']['metric_seconds']:.2f} s")


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(__doc__, "1-layer d=32 model, 4 x 16 tokens (a smoke run)",
                      (QUICK, FULL), bench, print_report, argv, default_out=HERE / "results-hessian-lanczos.json")


if __name__ == "__main__":
    sys.exit(main())
