"""Cost of structure.modularity on one GPT-2-small-shaped MLP (d_model 768, d_mlp 3072, random init).

Runs the metric on a one-block GPT-2 with that MLP (a 64-token vocabulary keeps the rest small) at
several ``max_edges`` with 9 shuffles, and prints the metric's seconds, the seconds per Louvain
run (observed + shuffles) and the graph's edges. Run: python bench/bench_modularity.py
"""

from __future__ import annotations

import time

import torch
import transformers as tf

from tensorscope_core import RunConfig, analyze
from tensorscope_core.testing import single_thread

METRIC = "structure.modularity"
PERMUTATIONS = 9


def main() -> None:
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=768, n_head=12, vocab_size=64, n_positions=64)).eval()
    print(f"GPT-2-small-shaped MLP: W_in 768 x 3072, W_out 3072 x 768; {PERMUTATIONS} shuffles; one thread")
    print(f"{'max_edges':>10} {'edges':>7} {'seconds':>8} {'s/Louvain':>10} {'Q':>7} {'null':>7} {'p':>5}")
    default = float("nan")
    for max_edges in (1024, 4096, 16384):
        params = {METRIC: {"max_edges": max_edges, "n_permutations": PERMUTATIONS, "heads": False}}
        start = time.perf_counter()
        with single_thread():
            result = analyze(model, metrics=[METRIC], params=params, config=RunConfig(seed=0)).get(METRIC)
        wall = time.perf_counter() - start
        assert result.ok, result.reason
        runs = PERMUTATIONS + 1
        per_run = result.seconds / runs
        if max_edges == 4096:
            default = per_run * 20 * 12
        print(
            f"{max_edges:>10} {int(result.value('mlp_edges')[0]):>7} {wall:>8.2f} {per_run:>10.3f} "
            f"{result.value('mlp_q')[0]:>7.3f} {result.value('mlp_null_mean')[0]:>7.3f} "
            f"{result.value('mlp_p_value')[0]:>5.2f}"
        )
    print(f"defaults (max_edges 4096, 19 shuffles) on GPT-2 small's 12 blocks: about {default / 60:.1f} min")


if __name__ == "__main__":
    main()
