"""Lanczos products of the two curvature metrics, kept graphs against recomputed, on the 135M shape.

    python bench/bench_hessian_product.py [--quick] [--threads N] [--reps R] [--clock cpu|wall] [--out PATH]

On the 135M shape ``hessian.lanczos`` and ``fisher.lanczos`` spend most of a ``--metrics all`` run in their
products (100 iterations x 4 batches each). Recomputed (``products='recomputed'``), each product
differentiates its batch from scratch: the Hessian's is ``torch.func.jvp`` of ``grad`` (forward-over-reverse),
the Fisher's (GGN) a JVP and a VJP, a forward each. The weights are fixed while Lanczos runs, so the graphs
can be built once per batch and kept (``products='kept-graph'``, the default): the Hessian keeps the loss's
first-order graph (``create_graph=True``) and each product is one backward through it
(``kept_graph_product``); the GGN keeps the logits' graph and that of J^T u for a zero dual u, and each
product is two backwards, J v (through the second) and J^T (H J v) (through the first)
(``kept_ggn_product``). This bench times the plugin's four product functions on one batch of the
135M-shaped random LLaMA (30 layers, d 576, 9 / 3 heads, vocabulary 49,152; quick: 4 layers, d 128). Per
operator the two ways give the same vectors; the bench reports the largest difference, relative to the
largest entry. Repetitions are interleaved, and the ratio kept / recomputed is taken per repetition. The
price of keeping is memory: the bench counts what a kept builder's graphs saved (unique storages, weights
left out) against ``kept_graph_bytes`` for the batch, and shows the logits-sized tensors the metric declares
beside the graph (the GGN's logits, zero dual and softmax); ``bench/memory_audit.py`` checks the whole
declaration against what the metrics held.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from bench_measure import LLAMA_135M, LLAMA_QUICK, Clock, LlamaSize, bench_main, ratio_str, spread, table, timed  # noqa: E402
from tensorscope_fisher.curvature import (  # noqa: E402
    FisherLanczos,
    HessianLanczos,
    ggn_product,
    hessian_product,
    kept_ggn_product,
    kept_graph_product,
)
from torch.func import functional_call  # noqa: E402

from tensorscope_core.plugin_api import kept_graph_bytes, model_view  # noqa: E402

#: products timed per repetition, operator and side
PRODUCTS = 3
#: (operator, side) in the order they are timed
SIDES = (("hessian", "recomputed"), ("hessian", "kept"), ("ggn", "recomputed"), ("ggn", "kept"))


def bench(size: LlamaSize, clock: str) -> dict[str, Any]:
    model = size.model().eval()
    model.config._attn_implementation = "eager"  # forward-mode AD has no rule for the fused CPU attention kernel
    ids = torch.randint(0, size.vocab, (size.batch, size.seq), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(size.batch, size.seq - 1)
    weights = {n: p.detach() for n, p in model.named_parameters()}

    def logits(w: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(model, w, args=(), kwargs={"input_ids": ids, "use_cache": False}).logits[:, :-1]

    def loss(w: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits(w).transpose(1, 2), ids[:, 1:], reduction="sum")

    gen = torch.Generator().manual_seed(1)
    tangents = [{n: torch.randn(t.shape, generator=gen) for n, t in weights.items()} for _ in range(PRODUCTS)]
    own = {t.untyped_storage().data_ptr() for t in weights.values()}
    held: dict[str, int] = {}

    def built(operator: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """The kept product, counting what its graphs saved (weights left out)."""
        saved: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            product = kept_graph_product([loss], weights) if operator == "hessian" \
                else kept_ggn_product([(logits, mask)], weights, 1.0)
        held[operator] = sum(n for ptr, n in saved.items() if ptr not in own)
        return product

    products = {("hessian", "recomputed"): hessian_product(loss, weights),
                ("ggn", "recomputed"): ggn_product(logits, weights, mask, 1.0)}
    clocks: dict[tuple[str, str], list[Clock]] = {side: [] for side in SIDES}
    answers: dict[tuple[str, str], list[dict[str, torch.Tensor]]] = {}
    for operator in ("hessian", "ggn"):  # one operator's graphs at a time
        products[(operator, "kept")] = built(operator)
        for rep in range(size.reps):
            for side in ("recomputed", "kept") if rep % 2 == 0 else ("kept", "recomputed"):
                c = Clock()
                with timed(c):
                    answers[(operator, side)] = [products[(operator, side)](v) for v in tangents]
                clocks[(operator, side)].append(c)
        del products[(operator, "kept")]
    out: dict[str, Any] = {"size": size.__dict__, "n_params": sum(p.numel() for p in model.parameters())}
    with model_view(model) as view:
        declared = kept_graph_bytes(view, size.batch, size.seq)
        logit_bytes = size.batch * size.seq * size.vocab * 4
    for operator, extra in (("hessian", HessianLanczos.kept_per_logit), ("ggn", FisherLanczos.kept_per_logit)):
        a, b = answers[(operator, "recomputed")], answers[(operator, "kept")]
        worst = max(float((a[i][n] - b[i][n]).abs().max() / a[i][n].abs().max().clamp(min=1e-30))
                    for i in range(PRODUCTS) for n in a[i])
        pairs = zip(clocks[(operator, "kept")], clocks[(operator, "recomputed")], strict=True)
        per_product = {side: spread([getattr(c, clock) / PRODUCTS for c in clocks[(operator, side)]])
                       for side in ("recomputed", "kept")}
        out[operator] = {
            "recomputed_s_per_product": per_product["recomputed"], "kept_s_per_product": per_product["kept"],
            "ratio": spread([getattr(k, clock) / getattr(r, clock) for k, r in pairs]), "max_rel_diff": worst,
            "kept_saved_bytes": held[operator], "declared_graph_bytes": declared,
            "declared_logit_bytes": extra * logit_bytes}
    return out


def print_report(report: dict[str, Any]) -> None:
    gib = 2**30
    rows = []
    for operator in ("hessian", "ggn"):
        r = report[operator]
        rows.append([f"{operator}, {report['size']['layers']} layers, {report['n_params']:,} parameters",
                     f"{r['recomputed_s_per_product']['median']:.3f}", f"{r['kept_s_per_product']['median']:.3f}",
                     ratio_str(r["ratio"]), f"{r['max_rel_diff']:.2g}",
                     f"{r['kept_saved_bytes'] / gib:.3f} / {r['declared_graph_bytes'] / gib:.3f}",
                     f"{r['declared_logit_bytes'] / gib:.3f}"])
    print(table(["operator, model", "recomputed (s / product)", "kept graphs (s / product)", "kept / recomputed",
                 "max rel diff", "graph saved / kept_graph_bytes (GiB)", "logits-sized kept (GiB)"], rows))


if __name__ == "__main__":
    raise SystemExit(bench_main(__doc__, "4 layers, d 128", (LLAMA_QUICK, LLAMA_135M), bench, print_report))
