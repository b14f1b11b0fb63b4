"""Hessian-vector products: forward-over-reverse (what ``hessian.lanczos`` does) against reverse-over-reverse
with the batch's first-order graph kept across products (a candidate, not used by any metric yet).

    python bench/bench_hessian_product.py [--quick] [--threads N] [--reps R] [--clock cpu|wall] [--out PATH]

On the 135M shape ``hessian.lanczos`` spends most of a ``--metrics all`` run in its products (400 of them:
100 iterations x 4 batches). Each is ``torch.func.jvp`` of ``grad`` of the batch's loss: a forward and a
backward carrying tangents, from scratch every time. The loss's first-order graph does not change between
products (the weights are fixed), so it can be built once per batch with ``create_graph=True``. After that,
each product is one backward through it: ``autograd.grad(g, w, v, retain_graph=True)``. This bench times
both ways on one batch of the 135M-shaped random LLaMA (30 layers, d 576, 9 / 3 heads, vocabulary 49,152;
quick: 4 layers, d 128). The products are the same vector; the bench reports the largest difference,
relative to the largest entry. Repetitions are interleaved, and the ratio kept / recomputed is taken per
repetition. The price of keeping the graph is memory. The bench measures it as the unique storages
autograd saves in the forward and in the first-order backward (weights left out), plus the gradient
itself.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from bench_measure import LLAMA_135M, LLAMA_QUICK, Clock, LlamaSize, bench_main, ratio_str, spread, table, timed  # noqa: E402
from tensorscope_fisher.curvature import hessian_product  # noqa: E402
from torch.func import functional_call  # noqa: E402

#: Hessian-vector products timed per repetition and side
PRODUCTS = 3


def bench(size: LlamaSize, clock: str) -> dict[str, Any]:
    model = size.model().eval()
    model.config._attn_implementation = "eager"  # forward-mode AD has no rule for the fused CPU attention kernel
    ids = torch.randint(0, size.vocab, (size.batch, size.seq), generator=torch.Generator().manual_seed(0))
    weights = {n: p.detach() for n, p in model.named_parameters()}

    def loss(w: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = functional_call(model, w, args=(), kwargs={"input_ids": ids, "use_cache": False}).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="sum")

    gen = torch.Generator().manual_seed(1)
    tangents = [{n: torch.randn(t.shape, generator=gen) for n, t in weights.items()} for _ in range(PRODUCTS)]
    recomputed = hessian_product(loss, weights)

    leaves = {n: t.clone().requires_grad_(True) for n, t in weights.items()}
    own = {t.untyped_storage().data_ptr() for t in leaves.values()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        first = torch.autograd.grad(loss(leaves), list(leaves.values()), create_graph=True)
    graph_bytes = sum(n for ptr, n in saved.items() if ptr not in own)
    gradient_bytes = sum(g.numel() * g.element_size() for g in first)

    def kept(v: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return list(torch.autograd.grad(first, list(leaves.values()), grad_outputs=list(v.values()),
                                        retain_graph=True))

    clocks: dict[str, list[Clock]] = {"recomputed": [], "kept": []}
    answers: dict[str, list[list[torch.Tensor]]] = {}
    for rep in range(size.reps):
        for side in ("recomputed", "kept") if rep % 2 == 0 else ("kept", "recomputed"):
            c = Clock()
            with timed(c):
                if side == "kept":
                    answers[side] = [kept(v) for v in tangents]
                else:
                    answers[side] = [list(recomputed(v).values()) for v in tangents]
            clocks[side].append(c)
    worst = max(float((a - b).abs().max() / a.abs().max().clamp(min=1e-30))
                for x, y in zip(answers["recomputed"], answers["kept"], strict=True)
                for a, b in zip(x, y, strict=True))
    ratios = [getattr(k, clock) / getattr(r, clock) for k, r in zip(clocks["kept"], clocks["recomputed"], strict=True)]
    per = PRODUCTS
    return {"size": size.__dict__, "n_params": sum(p.numel() for p in model.parameters()),
            "recomputed_s_per_product": spread([getattr(c, clock) / per for c in clocks["recomputed"]]),
            "kept_s_per_product": spread([getattr(c, clock) / per for c in clocks["kept"]]),
            "ratio": spread(ratios), "max_rel_diff": worst,
            "kept_graph_bytes": graph_bytes, "kept_gradient_bytes": gradient_bytes}


def print_report(report: dict[str, Any]) -> None:
    gib = 2**30
    print(table(["model", "recomputed (s / product)", "kept graph (s / product)", "kept / recomputed",
                 "max rel diff", "kept graph + gradient (GiB)"],
                [[f"{report['size']['layers']} layers, {report['n_params']:,} parameters",
                  f"{report['recomputed_s_per_product']['median']:.3f}",
                  f"{report['kept_s_per_product']['median']:.3f}", ratio_str(report["ratio"]),
                  f"{report['max_rel_diff']:.2g}",
                  f"{report['kept_graph_bytes'] / gib:.2f} + {report['kept_gradient_bytes'] / gib:.2f}"]]))


if __name__ == "__main__":
    raise SystemExit(bench_main(__doc__, "4 layers, d 128", (LLAMA_QUICK, LLAMA_135M), bench, print_report))
