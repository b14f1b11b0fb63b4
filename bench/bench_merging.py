"""merging: TIES against the reference's merge functions, and evaluating a merged model without copying it.

    python bench/bench_merging.py [--quick] [--threads N] [--reps R] [--clock cpu|wall] [--out PATH]

1. **TIES merge.** ``tensorscope_merging.ties.ties_merge`` (trim / elect / disjoint mean) against the
   reference ``prateeky2806/ties-merging`` ``src/utils/merge_utils.py`` functions ``topk_values_mask``,
   ``resolve_sign`` and ``disjoint_merge`` (transcribed below as published, with its ``clone()`` of the
   stacked task vectors in ``ties_merging``), on 3 random flat task vectors of d entries (full: 32M, a
   quarter of GPT-2 small, so the run stays within a shared machine's memory; quick: 4M), density 0.2.
   Equality: the merged vectors must be identical.
2. **Loss of a merged model.** ``tensorscope_merging.evaluate.evaluate`` (``functional_call`` on the
   core's hook-free copy, which shares the model's tensors: no weights are copied) against the usual
   way: ``copy.deepcopy`` of the model, ``load_state_dict`` of the merged weights, forward under
   ``no_grad``. GPT-2 small shape (quick: 2 layers, d 128), 2 batches of 4 x 64 tokens (quick: 32).
   Equality: the losses agree to 1e-6 (relative). Memory: the bytes of tensor storage each side's
   module holds that the model does not (measured on the modules: storages not shared with the model).

Each repetition times both sides back to back in this process (interleaved, the order alternating);
ratios are ours / theirs per repetition, reported as the median with min-max. Clock: process CPU time
by default (the shared bench machine), ``--clock wall`` for wall time.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from bench_measure import Clock, spread, table, timed  # noqa: E402
from bench_models import BenchSize, describe, gpt2_model, random_tokens  # noqa: E402
from tensorscope_merging.evaluate import POOLED, evaluate  # noqa: E402
from tensorscope_merging.ties import ties_merge  # noqa: E402

from tensorscope_core.data import PreparedData  # noqa: E402
from tensorscope_core.functional import hook_free_copy  # noqa: E402
from tensorscope_core.models.adapters.gpt2 import GPT2Adapter  # noqa: E402

GOALS = {"ties": 1.0, "merged_loss": 1.0}  # ours / theirs time (parity: no slower than the reference)
DENSITY = 0.2
N_TASKS = 3


# -- the reference (prateeky2806/ties-merging, src/utils/merge_utils.py), transcribed ----------------
def ref_topk_values_mask(M: torch.Tensor, K: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    if K > 1:
        K /= 100
    original_shape = M.shape
    if M.dim() == 1:
        M = M.unsqueeze(0)
    n, d = M.shape
    k = int(d * K)
    k = d - k  # Keep top k elements instead of bottom k elements
    kth_values, _ = M.abs().kthvalue(k, dim=1, keepdim=True)
    mask = M.abs() >= kth_values
    final_mask = mask.squeeze() if original_shape == M.squeeze().shape else mask
    return M * final_mask, final_mask.float().mean(dim=1)


def ref_resolve_sign(tensor: torch.Tensor) -> torch.Tensor:
    sign_to_mult = torch.sign(tensor.sum(dim=0))
    majority_sign = torch.sign(sign_to_mult.sum())
    sign_to_mult[sign_to_mult == 0] = majority_sign
    return sign_to_mult


def ref_disjoint_merge(tensor: torch.Tensor, sign_to_mult: torch.Tensor) -> torch.Tensor:
    rows_to_keep = torch.where(sign_to_mult.unsqueeze(0) > 0, tensor > 0, tensor < 0)
    selected_entries = tensor * rows_to_keep
    non_zero_counts = (selected_entries != 0).sum(dim=0).float()
    return torch.sum(selected_entries, dim=0) / torch.clamp(non_zero_counts, min=1)


def ref_ties_merging(flat_task_checks: torch.Tensor, reset_thresh: float) -> torch.Tensor:
    all_checks = flat_task_checks.clone()
    updated_checks, *_ = ref_topk_values_mask(all_checks, K=reset_thresh)
    final_signs = ref_resolve_sign(updated_checks)
    return ref_disjoint_merge(updated_checks, final_signs)


# -- the merged-model loss, the usual way --------------------------------------------------------------
def copied_model_loss(model: torch.nn.Module, merged: dict[str, torch.Tensor], data: PreparedData) -> float:
    """Token-mean next-token loss of ``model`` with ``merged`` loaded into a deep copy of it."""
    clone = copy.deepcopy(model)
    clone.load_state_dict(merged, strict=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data.batches():
            logits = clone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
            mask = batch.attention_mask[:, 1:].bool()
            chosen = logits[:, :-1][mask]
            total += float(torch.nn.functional.cross_entropy(chosen, batch.input_ids[:, 1:][mask], reduction="sum"))
            count += int(mask.sum())
    return total / count


def new_storage_bytes(module: torch.nn.Module, model: torch.nn.Module) -> int:
    """Bytes of the parameter and buffer storages of ``module`` that ``model`` does not share."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def compare(name: str, ours: Callable[[], Any], theirs: Callable[[], Any], reps: int, clock: str,
            agree: Callable[[Any, Any], float]) -> dict[str, Any]:
    """Interleaved repetitions (the order alternating); ratios ours / theirs per repetition."""
    ratios, ours_s, theirs_s, worst = [], [], [], 0.0
    for rep in range(reps):
        a, b = Clock(), Clock()
        order = [(a, ours), (b, theirs)] if rep % 2 == 0 else [(b, theirs), (a, ours)]
        outputs: dict[int, Any] = {}
        for into, fn in order:
            gc.collect()
            with timed(into):
                outputs[id(into)] = fn()
        worst = max(worst, agree(outputs[id(a)], outputs[id(b)]))
        sa, sb = getattr(a, clock), getattr(b, clock)
        ours_s.append(sa)
        theirs_s.append(sb)
        ratios.append(sa / sb)
    ratio = spread(ratios)
    return {"name": name, "ratio": ratio, "ours_s": spread(ours_s), "theirs_s": spread(theirs_s),
            "disagreement": worst, "goal": GOALS[name], "meets_goal": ratio["median"] <= GOALS[name]}


def bench_ties(d: int, reps: int, clock: str) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    vectors = 0.01 * torch.randn(N_TASKS, d, generator=gen)
    out = compare("ties", lambda: ties_merge(vectors, DENSITY)[2], lambda: ref_ties_merging(vectors, DENSITY), reps,
                  clock, lambda x, y: float((x - y).abs().max()))
    out["d"] = d
    return out


def bench_merged_loss(size: BenchSize, reps: int, clock: str) -> dict[str, Any]:
    model = gpt2_model(size.quick)
    view = GPT2Adapter().build(model, "bench", None)
    gen = torch.Generator().manual_seed(1)
    merged = {n: p.detach() + 0.01 * torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}
    rows = list(random_tokens(model.config.vocab_size, size))
    data = PreparedData({None: rows}, size.batch_size, pad_token_id=0)
    out = compare("merged_loss", lambda: evaluate(view, merged, data, seed=0)[POOLED].loss,
                  lambda: copied_model_loss(model, merged, data), reps, clock,
                  lambda x, y: abs(x - y) / abs(y))
    out["model"] = describe(model)
    clone = copy.deepcopy(model)
    clone.load_state_dict(merged, strict=False)
    out["extra_bytes"] = {"ours": new_storage_bytes(hook_free_copy(view), model),
                          "theirs": new_storage_bytes(clone, model)}
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = BenchSize(quick=True, batch_size=4, seq_len=32, n_batches=2, reps=3) if args.quick else \
        BenchSize(quick=False, batch_size=4, seq_len=64, n_batches=2, reps=5)
    reps = args.reps or size.reps
    results = [bench_ties(4_000_000 if args.quick else 32_000_000, reps, args.clock),
               bench_merged_loss(size, reps, args.clock)]
    rows = [[r["name"], f"{r['ratio']['median']:.3f} ({r['ratio']['min']:.3f}-{r['ratio']['max']:.3f})",
             f"{r['ours_s']['median']:.3f}", f"{r['theirs_s']['median']:.3f}", f"{r['disagreement']:.2e}",
             f"<= {r['goal']}", "yes" if r["meets_goal"] else "NO"] for r in results]
    print(table(["benchmark", "ours/theirs (min-max)", "ours s", "theirs s", "max diff", "goal", "met"], rows))
    extra = results[1]["extra_bytes"]
    print(f"merged model: extra tensor bytes held, ours {extra['ours']}, a copied model {extra['theirs']}")
    report = {"benchmark": "merging", "date": dt.datetime.now(dt.timezone.utc).isoformat(), "quick": args.quick,
              "clock": args.clock, "threads": args.threads, "reps": reps, "python": sys.version.split()[0],
              "torch": torch.__version__, "platform": platform.platform(), "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
