"""Forwards resumed at the intervened block against full forwards: circuits.ablation's sweep.

    python bench/bench_resume.py [--quick] [--threads N] [--reps R] [--clock cpu|wall] [--out PATH]

``circuits.ablation`` runs one forward per batch for every head and MLP of every layer (2,404
forwards on the 135M shape with the bench's data). A head or MLP of block l changes nothing
before block l, so since this version each of those forwards resumes at block l from one recorded
clean forward of the batch (``recorded_blocks`` / ``resumed_at``). Here both ways run the same sweep
on one batch of the 135M-shaped random LLaMA (30 layers, d 576, 9 / 3 heads, vocabulary 49,152;
quick: 4 layers, d 128): head 0 of every layer zeroed, one forward each (every block is a
resume point once, so the ratio is the whole sweep's); the resumed side includes its recording
forward. Interleaved repetitions, ratio resumed / full per repetition, and the largest difference
of the per-sequence losses between the two ways (expected: exactly 0).
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from bench_measure import LLAMA_135M, LLAMA_QUICK, Clock, LlamaSize, bench_main, ratio_str, spread, table, timed  # noqa: E402

from tensorscope_core.plugin_api import model_view, recorded_blocks, resumed_at  # noqa: E402


def bench(size: LlamaSize, clock: str) -> dict[str, Any]:
    model = size.model()
    ids = torch.randint(0, size.vocab, (size.batch, size.seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def loss() -> torch.Tensor:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").sum(1)

    with model_view(model) as view, torch.no_grad():
        def zero_head(layer: int) -> Any:
            def edit(module: torch.nn.Module, args: tuple) -> tuple:
                z = args[0].clone()
                z[..., :view.d_head] = 0
                return (z, *args[1:])
            return view.attn_out[layer].register_forward_pre_hook(edit)

        def sweep(resume: bool) -> torch.Tensor:
            outputs: list[Any] = []
            if resume:
                with recorded_blocks(view) as outputs:
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
            losses = []
            for layer in range(view.n_layers):
                handle = zero_head(layer)
                with resumed_at(view, layer if resume else 0, outputs):
                    losses.append(loss())
                handle.remove()
            return torch.stack(losses)

        clocks: dict[str, list[Clock]] = {"full": [], "resumed": []}
        answers = {}
        for _ in range(size.reps):
            for side in ("full", "resumed"):
                c = Clock()
                with timed(c):
                    answers[side] = sweep(side == "resumed")
                clocks[side].append(c)
    ratios = [getattr(r, clock) / getattr(f, clock) for r, f in zip(clocks["resumed"], clocks["full"], strict=True)]
    return {"size": size.__dict__, "n_params": sum(p.numel() for p in model.parameters()),
            "full_s": spread([getattr(c, clock) for c in clocks["full"]]),
            "resumed_s": spread([getattr(c, clock) for c in clocks["resumed"]]),
            "ratio": spread(ratios), "max_abs_loss_diff": float((answers["full"] - answers["resumed"]).abs().max())}


def print_report(report: dict[str, Any]) -> None:
    print(table(["model", "full sweep (s)", "resumed sweep (s)", "resumed / full", "max |loss diff|"],
                [[f"{report['size']['layers']} layers, {report['n_params']:,} parameters",
                  f"{report['full_s']['median']:.2f}", f"{report['resumed_s']['median']:.2f}",
                  ratio_str(report["ratio"]), f"{report['max_abs_loss_diff']:.3g}"]]))


if __name__ == "__main__":
    raise SystemExit(bench_main(__doc__, "4 layers, d 128", (LLAMA_QUICK, LLAMA_135M), bench, print_report))
