"""fisher.stein exact against the reference toolkit's algorithm, reimplemented here from its description.

    python bench/bench_fisher_stein.py [--quick] [--threads N] [--reps R] [--clock cpu|wall] [--out PATH]

Model: GPT-2-small shape (12 layers, d 768, 12 heads, vocab 50257, random init with a fixed seed, eager
attention, float32, eval; ``--quick``: 2 layers, d 128); h = the residual entering block 6 (quick: 1) at the
last position of a random context of 64 and of 512 tokens (quick: 16, 64).

Ours: ``tensorscope_fisher.fisher_stein(view, layer, ids)``: one forward of the sequence with the KV cache,
then the upper layers at the last position only, d batched single-position backward passes for
J_g = dg/dh (g = final-norm output), F = J_g^T M J_g with M = W_U^T diag(p) W_U - (W_U^T p)(W_U^T p)^T.

Reference (dashstander/fisher-stein, ``UpperLayersModel.jacobian`` + ``fim_expected_gradient_outerproduct``),
on its own copy of the model with every parameter frozen, as its split models freeze theirs (unfrozen, each
vmapped backward also records its graph for the weights: 12x the memory): the lower blocks on the sequence;
the final latent h = the last position's residual and the context = the positions before it (not the
reference's off-by-one, which counts the last context position twice); the upper blocks run on [context, h]
(the whole context) with an explicit causal mask (called bare, GPT-2's blocks would attend non-causally), then
ln_f; ``jacrev`` over h (d backward passes through the upper blocks on the whole context); chained through
lm_head into the V x d logit Jacobian; a JVP through log_softmax per column; then
``G^T diag(p) G - (G^T p)(G^T p)^T``.

At 64 tokens (quick: 64) the reference also runs WHOLE, as a user writes it: split, one ``jacrev`` over h
(all d columns in one vmap), the V x d chain, end to end, timed interleaved with ours; its peak tensor memory
is measured (``torch.profiler``, an untimed run) and its matrix checked against ours. At 512 tokens the whole
reference would not fit this 24 GiB machine (its jacrev alone ~29 GiB by the slice extrapolation below).

At every context, the reference's d backward passes are also timed on a slice of the d cotangents (``vmap``
over a slice of the identity rows, as ``jacrev`` with a chunk does) and extrapolated linearly to d; its V x d
chain is timed in full. Its peak tensor memory is measured (allocator events of ``torch.profiler``, untimed
runs) at two slice sizes and extrapolated linearly to d. Equality: the full reference matrix (all d
cotangents) at a short context, and the reference's Jacobian rows of the timed slice against ours at every
context.

Floor: d single-position backward passes (the batched backward alone, given the forward) plus one V x d x d
contraction (``W^T (p * W)``); ours / floor says how close ours runs to it. README pseudocode: reverse-mode
Jacobian of softmax(upper(h, context)) over the whole vocabulary (V backward passes through the upper blocks
on the whole context), timed on a slice of the vocabulary rows and extrapolated to V.
"""

from __future__ import annotations

import copy
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
from bench_measure import Clock, bench_main, ratio_str, spread, table, timed  # noqa: E402
from bench_models import describe, gpt2_model  # noqa: E402

HERE = Path(__file__).resolve().parent
GOALS = {64: 15.0, 512: 80.0}  # reference time / ours, by context length (full run)
MEMORY_GOAL = 0.2  # ours' peak / the reference's peak
AGREEMENT = 1e-5  # relative Frobenius error of the matrix


@dataclass(frozen=True)
class SteinSize:
    quick: bool
    layer: int
    contexts: tuple[int, ...]
    equality_context: int  # the full reference runs at this context length
    ref_slice: dict[int, int]  # context -> cotangents timed for the reference
    readme_slice: int  # vocabulary rows timed for the README pseudocode
    reps: int
    whole_context: int  # the reference also runs whole (all d columns, end to end) at this context length


FULL = SteinSize(
    quick=False,
    layer=6,
    contexts=(64, 512),
    equality_context=4,
    ref_slice={64: 16, 512: 4},
    readme_slice=2,
    reps=3,
    whole_context=64,
)
QUICK = SteinSize(
    quick=True,
    layer=1,
    contexts=(16, 64),
    equality_context=8,
    ref_slice={16: 32, 64: 32},
    readme_slice=16,
    reps=3,
    whole_context=64,
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- the reference, reimplemented -------------------------------------------------------------------


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def causal_mask(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive [1, 1, n, n] mask: 0 on and below the diagonal, the dtype's minimum above."""
    return torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)[None, None]


class Reference:
    """The reference toolkit's split model on a GPT-2: lower blocks, upper blocks + ln_f, lm_head."""

    def __init__(self, model: Any, layer: int) -> None:
        # its own copy with every parameter frozen, as the toolkit's split models do: with weights that
        # require grad, each vmapped backward would also record its graph for them (12x the memory)
        model = copy.deepcopy(model).requires_grad_(False)
        self.model, self.layer = model, layer
        self.body = model.transformer
        self.weight = model.lm_head.weight.detach()

    @torch.no_grad()
    def lower(self, ids: torch.Tensor) -> torch.Tensor:
        """Residual entering block ``layer`` at every position [T, d]."""
        n = ids.numel()
        x = self.body.wte(ids[None]) + self.body.wpe(torch.arange(n)[None])
        mask = causal_mask(n, x.dtype)
        for block in self.body.h[: self.layer]:
            x = _first(block(x, attention_mask=mask))
        return x[0]

    def upper(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """ln_f output at the last position of [context, h] through the upper blocks (causal mask)."""
        x = torch.cat([context, h[None]], dim=0)[None]
        mask = causal_mask(x.shape[1], x.dtype)
        for block in self.body.h[self.layer :]:
            x = _first(block(x, attention_mask=mask))
        return self.body.ln_f(x)[0, -1]

    def split(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.lower(ids)
        return hidden[-1].clone(), hidden[:-1].clone()  # final latent = last position; context = before it

    def jacobian_rows(self, h: torch.Tensor, context: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` of J_hidden = d ln_f(upper)/dh [len(rows), d]: jacrev's vmap of the VJP on a slice."""
        vjp_fn = torch.func.vjp(lambda x: self.upper(x, context), h)[1]
        eye = torch.eye(h.numel(), dtype=h.dtype)[rows]
        return torch.vmap(vjp_fn)(eye)[0]

    def whole(self, ids: torch.Tensor) -> torch.Tensor:
        """F end to end as a user writes it: split, one ``jacrev`` over h (all d columns in one vmap), then
        the V x d chain."""
        h, context = self.split(ids)
        j_hidden = torch.func.jacrev(lambda x: self.upper(x, context))(h)
        return self.chain(h, context, j_hidden)

    def chain(self, h: torch.Tensor, context: torch.Tensor, j_hidden: torch.Tensor) -> torch.Tensor:
        """J_hidden [d, d] -> F: logit Jacobian, log_softmax JVP per column, G^T diag(p) G - (G^T p)(G^T p)^T."""
        j_logits = torch.einsum("vk,kh->vh", self.weight, j_hidden)  # [V, d]
        with torch.no_grad():
            logits = self.model.lm_head(self.upper(h, context))
            probs = torch.softmax(logits, dim=-1)

        def column(col: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(lambda z: torch.log_softmax(z, dim=-1), (logits,), (col,))[1]

        grads = torch.vmap(column, in_dims=1)(j_logits).T  # [V, d]
        weighted = grads * probs[:, None]
        first = grads.T @ weighted
        mean = grads.T @ probs
        return first - torch.outer(mean, mean)

    def readme_rows(self, h: torch.Tensor, context: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """README pseudocode: rows of jacrev(softmax(upper)) over the vocabulary [len(rows), d]."""

        def probs_of(x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.model.lm_head(self.upper(x, context)), dim=-1)

        vjp_fn = torch.func.vjp(probs_of, h)[1]
        eye = torch.zeros(rows.numel(), self.weight.shape[0], dtype=h.dtype)
        eye[torch.arange(rows.numel()), rows] = 1.0
        return torch.vmap(vjp_fn)(eye)[0]


# -- measuring --------------------------------------------------------------------------------------


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of live tensor bytes allocated while ``fn`` runs (CPU allocator events of torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def clocked(fn: Callable[[], Any]) -> tuple[Clock, Any]:
    gc.collect()
    clock = Clock()
    with timed(clock):
        out = fn()
    return clock, out


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest entry difference over the largest entry of ``b`` (entrywise ratios blow up near zero)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


# -- the benchmark ----------------------------------------------------------------------------------


def extrapolated(
    clocks: dict[str, list[Clock]], which: str, d: int, vocab: int, c: int, readme_rows: int
) -> dict[str, list[float]]:
    """Per repetition: the reference's full time (its d cotangents from a slice of c), the README
    pseudocode's (V vocabulary rows from a slice) and the floor."""
    out: dict[str, list[float]] = {"ref_full": [], "readme_full": [], "floor": []}
    for i in range(len(clocks["ours"])):
        t = {k: getattr(v[i], which) for k, v in clocks.items()}
        # one forward (the VJP's), then the vmapped backward of the slice (slice minus forward) d / c times
        backward = max(t["ref_slice"] - t["ref_forward"], 0.0)
        out["ref_full"].append(t["ref_split"] + t["ref_forward"] + backward * d / c + t["ref_chain"])
        readme_backward = max(t["readme_slice"] - t["ref_forward"], 0.0)
        out["readme_full"].append(t["ref_split"] + t["ref_forward"] + readme_backward * vocab / readme_rows)
        out["floor"].append(t["floor_backward"] + t["floor_contraction"])
    return out


def bench_context(view: Any, ref: Reference, size: SteinSize, ids: torch.Tensor, primary: str) -> dict[str, Any]:
    """Timing, memory and agreement at one context length (``ids`` [n])."""
    from tensorscope_fisher import fisher_stein
    from tensorscope_fisher.stein import Site, context_states, forward_site, jacobian_g

    n, c = ids.numel(), size.ref_slice[ids.numel()]
    d, vocab = view.d_model, view.vocab_size
    rows = torch.arange(c)
    weight = ref.weight

    def ours(x: torch.Tensor) -> torch.Tensor:
        return fisher_stein(view, size.layer, x[None])[0]

    log(f"[fisher.stein] context {n}: warm-up and checks")
    ours(ids[:8])
    h, context = ref.split(ids)
    ref.jacobian_rows(h, context, rows[:2])
    kv, _ = context_states(view, ids)
    site = Site(kv, n - 1, int(ids[-1]))
    slice_error = rel_error(ref.jacobian_rows(h, context, rows), jacobian_g(view, size.layer, site)[:c])
    logits = forward_site(view, size.layer, site, grad=False).logits
    assert logits is not None
    p = torch.softmax(logits[0], dim=-1)
    copies = forward_site(view, size.layer, site, copies=d, logits=False)  # the floor's forward, untimed
    eye = torch.eye(d)
    variants: dict[str, Callable[[], Any]] = {
        "ours": lambda: ours(ids),
        "ref_split": lambda: ref.split(ids),
        "ref_forward": lambda: torch.func.vjp(lambda x: ref.upper(x, context), h),
        "ref_slice": lambda: ref.jacobian_rows(h, context, rows),
        "ref_chain": lambda: ref.chain(h, context, torch.zeros(d, d)),
        "readme_slice": lambda: ref.readme_rows(h, context, torch.arange(size.readme_slice)),
        "floor_backward": lambda: torch.autograd.grad(copies.g, copies.h, eye, retain_graph=True),
        "floor_contraction": lambda: weight.T @ (weight * p[:, None]),
    }
    if n == size.whole_context:
        variants["ref_whole"] = lambda: ref.whole(ids)
    clocks: dict[str, list[Clock]] = {k: [] for k in variants}
    kept: dict[str, torch.Tensor] = {}  # the last matrices of ours and of the whole reference
    for rep in range(size.reps):
        for key in list(variants) if rep % 2 == 0 else list(variants)[::-1]:
            clock, out = clocked(variants[key])
            clocks[key].append(clock)
            if key in ("ours", "ref_whole"):
                kept[key] = out
            del out
        log(
            f"[fisher.stein] context {n}, repetition {rep + 1}/{size.reps}: ours "
            f"{getattr(clocks['ours'][-1], primary):.2f} s, reference slice of {c} cotangents "
            f"{getattr(clocks['ref_slice'][-1], primary):.2f} s"
            + (f", reference whole {getattr(clocks['ref_whole'][-1], primary):.2f} s" if "ref_whole" in clocks else "")
        )
    timing: dict[str, Any] = {}
    for which in ("cpu", "wall"):
        derived = extrapolated(clocks, which, d, vocab, c, size.readme_slice)
        ours_t = [getattr(x, which) for x in clocks["ours"]]
        timing[which] = {
            "speedup_vs_reference": spread([r / o for r, o in zip(derived["ref_full"], ours_t, strict=True)]),
            "speedup_vs_readme": spread([r / o for r, o in zip(derived["readme_full"], ours_t, strict=True)]),
            "ours_over_floor": spread([o / f for o, f in zip(ours_t, derived["floor"], strict=True)]),
            "ours_seconds": ours_t,
            "reference_seconds_extrapolated": derived["ref_full"],
            "readme_seconds_extrapolated": derived["readme_full"],
            "floor_seconds": derived["floor"],
        }
    log(f"[fisher.stein] context {n}: peak memory (untimed, profiler)")
    ours_peak = peak_bytes(lambda: ours(ids))
    half = max(1, c // 2)
    slice_peaks = {
        k: peak_bytes(lambda k=k: ref.jacobian_rows(h, context, torch.arange(k)))  # type: ignore[misc]
        for k in (half, c)
    }
    slope = (slice_peaks[c] - slice_peaks[half]) / max(c - half, 1)
    jac_peak = slice_peaks[c] + slope * (d - c)
    chain_peak = peak_bytes(lambda: ref.chain(h, context, torch.zeros(d, d)))
    ref_peak = max(jac_peak, chain_peak + d * d * 4)  # the chain runs with J_hidden [d, d] alive
    goal = None if size.quick else GOALS.get(n)
    speed = timing[primary]["speedup_vs_reference"]["median"]
    whole = whole_report(ref, ids, clocks, kept, ours_peak, primary, goal) if "ref_whole" in clocks else None
    return {
        "whole": whole,
        "ref_slice_cotangents": c,
        "timing": timing,
        "speed_goal": goal,
        "speed_met": None if goal is None else speed >= goal,
        "memory": {
            "ours_peak_bytes": ours_peak,
            "reference_slice_peaks": {str(k): v for k, v in slice_peaks.items()},
            "reference_jacrev_peak_extrapolated": jac_peak,
            "reference_chain_peak": chain_peak,
            "reference_peak_extrapolated": ref_peak,
            "ratio": ours_peak / ref_peak,
            "met": ours_peak / ref_peak <= MEMORY_GOAL,
        },
        "slice_rows_rel_frobenius": slice_error,
    }


def whole_report(
    ref: Reference,
    ids: torch.Tensor,
    clocks: dict[str, list[Clock]],
    kept: dict[str, torch.Tensor],
    ours_peak: int,
    primary: str,
    goal: float | None,
) -> dict[str, Any]:
    """The whole reference against ours: measured time ratio, its measured peak memory and its matrix."""
    n = ids.numel()
    log(f"[fisher.stein] context {n}: whole reference peak memory (untimed, profiler)")
    measured = peak_bytes(lambda: ref.whole(ids))
    timing: dict[str, Any] = {}
    for which in ("cpu", "wall"):
        ref_t, ours_t = ([getattr(x, which) for x in clocks[k]] for k in ("ref_whole", "ours"))
        timing[which] = {
            "speedup": spread([r / o for r, o in zip(ref_t, ours_t, strict=True)]),
            "reference_seconds": ref_t,
            "ours_seconds": ours_t,
        }
    speed = timing[primary]["speedup"]["median"]
    return {
        "context": n,
        "timing": timing,
        "speed_goal": goal,
        "speed_met": None if goal is None else speed >= goal,
        "memory": {"reference_peak_bytes": measured, "ours_peak_bytes": ours_peak, "ratio": ours_peak / measured},
        "rel_frobenius": rel_error(kept["ref_whole"], kept["ours"]),
        "max_rel": max_rel_error(kept["ref_whole"], kept["ours"]),
    }


def bench(size: SteinSize, primary: str = "cpu") -> dict[str, Any]:
    """The benchmark; returns its report (see print_report)."""
    from tensorscope_fisher import fisher_stein
    from tensorscope_fisher.stein_api import model_view

    model = gpt2_model(size.quick)
    ref = Reference(model, size.layer)
    d, vocab = model.config.n_embd, model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    settings = dataclasses.asdict(size)
    settings["ref_slice"] = {str(k): v for k, v in size.ref_slice.items()}
    report: dict[str, Any] = {
        "model": describe(model),
        "settings": settings,
        "primary_clock": primary,
        "goals": {str(k): v for k, v in GOALS.items()},
        "memory_goal": MEMORY_GOAL,
        "agreement_goal": AGREEMENT,
        "contexts": {},
    }
    with model_view(model) as view:
        ids = torch.randint(0, vocab, (size.equality_context,), generator=gen)
        log(f"[fisher.stein] full-reference equality at context {size.equality_context}")
        h, context = ref.split(ids)
        ref_full = ref.chain(h, context, ref.jacobian_rows(h, context, torch.arange(d)))
        report["equality_full"] = {
            "context": size.equality_context,
            "rel_frobenius": rel_error(fisher_stein(view, size.layer, ids[None])[0], ref_full),
        }
        del ref_full
        for n in size.contexts:
            report["contexts"][str(n)] = bench_context(
                view, ref, size, torch.randint(0, vocab, (n,), generator=gen), primary
            )
    report["agreement_met"] = report["equality_full"]["rel_frobenius"] <= AGREEMENT and all(
        c["slice_rows_rel_frobenius"] <= AGREEMENT for c in report["contexts"].values()
    )
    return report


# -- printing ---------------------------------------------------------------------------------------


def print_report(report: dict[str, Any]) -> None:
    s, m = report["settings"], report["model"]
    primary = report["primary_clock"]
    other = "wall" if primary == "cpu" else "cpu"
    print(
        f"\nfisher.stein exact vs the reference algorithm ({'quick' if s['quick'] else 'full'}): "
        f"{m['class']} {m['n_layers']} layers, d {m['d_model']}, vocab {m['vocab_size']}, "
        f"{m['attn_implementation']} attention, layer {s['layer']}, last position, {s['reps']} interleaved "
        "repetitions"
    )

    rows = []
    for n, c in report["contexts"].items():
        t = c["timing"]
        goal = "" if c["speed_goal"] is None else f">= {c['speed_goal']:g}"
        verdict = "" if c["speed_met"] is None else ("MET" if c["speed_met"] else "MISSED")
        rows.append(
            [
                f"context {n}: reference (extrapolated) / ours",
                ratio_str(t[primary]["speedup_vs_reference"], 2),
                ratio_str(t[other]["speedup_vs_reference"], 2),
                goal,
                verdict,
            ]
        )
        if c["whole"] is not None:
            w = c["whole"]
            w_verdict = "" if w["speed_met"] is None else ("MET" if w["speed_met"] else "MISSED")
            rows.append(
                [
                    f"context {n}: reference whole (measured) / ours",
                    ratio_str(w["timing"][primary]["speedup"], 2),
                    ratio_str(w["timing"][other]["speedup"], 2),
                    goal,
                    w_verdict,
                ]
            )
            w_mem = w["memory"]["ratio"]
            rows.append(
                [
                    f"context {n}: peak memory ours / reference whole (measured)",
                    f"{w_mem:.4f}",
                    "",
                    f"<= {report['memory_goal']}",
                    "MET" if w_mem <= report["memory_goal"] else "MISSED",
                ]
            )
        rows.append(
            [
                f"context {n}: README pseudocode / ours",
                ratio_str(t[primary]["speedup_vs_readme"], 2),
                ratio_str(t[other]["speedup_vs_readme"], 2),
                "",
                "",
            ]
        )
        rows.append(
            [
                f"context {n}: ours / floor",
                ratio_str(t[primary]["ours_over_floor"], 2),
                ratio_str(t[other]["ours_over_floor"], 2),
                "",
                "",
            ]
        )
        mem = c["memory"]
        rows.append(
            [
                f"context {n}: peak memory ours / reference (extrapolated)",
                f"{mem['ratio']:.4f}",
                "",
                f"<= {report['memory_goal']}",
                "MET" if mem["met"] else "MISSED",
            ]
        )
    print(table(["ratio", primary, other, "goal", "verdict"], rows))
    for n, c in report["contexts"].items():
        mem, t = c["memory"], c["timing"][primary]
        print(
            f"  context {n}: ours {min(t['ours_seconds']):.2f} s; reference "
            f"{min(t['reference_seconds_extrapolated']):.1f} s EXTRAPOLATED from a slice of "
            f"{c['ref_slice_cotangents']} of the {report['model']['d_model']} cotangents; "
            f"README pseudocode {min(t['readme_seconds_extrapolated']):.0f} s EXTRAPOLATED from "
            f"{report['settings']['readme_slice']} of the {report['model']['vocab_size']} vocabulary rows; "
            f"floor {min(t['floor_seconds']):.2f} s (minimum over repetitions)"
        )
        print(
            f"    peak tensor memory: ours {mem['ours_peak_bytes'] / 2**20:.0f} MiB, reference "
            f"{mem['reference_peak_extrapolated'] / 2**20:.0f} MiB (jacrev peak EXTRAPOLATED linearly from "
            f"slices {list(mem['reference_slice_peaks'])}; its V x d chain {mem['reference_chain_peak'] / 2**20:.0f} "
            f"MiB measured); Jacobian rows of the slice vs ours: rel. error {c['slice_rows_rel_frobenius']:.1e}"
        )
    for n, c in report["contexts"].items():
        if c["whole"] is not None:
            print_whole(n, c["whole"], primary, report["model"]["d_model"])
    eq = report["equality_full"]
    print(
        f"  whole matrix vs the full reference at context {eq['context']}: rel. Frobenius error "
        f"{eq['rel_frobenius']:.2e} (goal <= {report['agreement_goal']:g}: "
        f"{'MET' if report['agreement_met'] else 'MISSED'})"
    )


def print_whole(n: str, w: dict[str, Any], primary: str, d: int) -> None:
    mem, t = w["memory"], w["timing"][primary]
    print(
        f"  context {n}, reference WHOLE (one jacrev over all {d} columns, then the V x d chain; end to end, "
        f"interleaved with ours): {min(t['reference_seconds']):.1f} s vs ours {min(t['ours_seconds']):.2f} s "
        "(minimum over repetitions)"
    )
    print(
        f"    peak tensor memory measured (profiler): reference {mem['reference_peak_bytes'] / 2**20:.0f} MiB, "
        f"ours {mem['ours_peak_bytes'] / 2**20:.0f} MiB, ours / reference {mem['ratio']:.4f}; whole matrix vs ours: "
        f"rel. Frobenius error {w['rel_frobenius']:.1e}, max entry difference / max entry {w['max_rel']:.1e}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    return bench_main(
        __doc__, "2-layer d=128 model, contexts 16 and 64 (a smoke run)", (QUICK, FULL), bench, print_report, argv
    )


if __name__ == "__main__":
    sys.exit(main())
