"""IMP cost per round against one-shot magnitude masks, side by side in one run.

lottery.imp trains K steps per round (forward + backward each) and evaluates the loss on the
batches cycled; lottery.magnitude_masks cuts one-shot masks at the same sparsities and evaluates
their loss. Both run on the same model, data and batches, in one process:

    python plugins/tensorscope-merging/bench/bench_imp.py [--d-model 64] [--steps 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tensorscope_core import RunConfig, analyze
from tensorscope_core.testing import random_token_data, single_thread, tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, single_thread():
        model = tiny_model("gpt2", Path(tmp) / "gpt2", n_layers=args.layers, d_model=args.d_model)
        data = random_token_data(64, n=16, length=32, seed=0)  # 4 batches of 4
        sparsities = [round(1 - (1 - args.fraction) ** i, 6) for i in range(1, args.rounds + 1)]
        params = {"lottery.imp": {"steps": args.steps, "rounds": args.rounds, "prune_fraction": args.fraction,
                                  "rewind_step": 1, "lr": 0.05},
                  "lottery.magnitude_masks": {"sparsities": sparsities}}
        res = analyze(model, data=data, metrics=list(params), params=params,
                      config=RunConfig(batch_size=4, max_length=32, force_recompute=True))
        imp, masks = res.get("lottery.imp"), res.get("lottery.magnitude_masks")
        per_round = imp.seconds / (args.rounds + 1)
        per_mask = masks.seconds / len(sparsities)
        print(f"gpt2 d_model={args.d_model} layers={args.layers}, K={args.steps}, n={args.rounds}, p={args.fraction}")
        print(f"{'metric':<26}{'seconds':>10}{'model calls':>13}{'declared MiB':>14}")
        for r in (imp, masks):
            print(f"{r.metric:<26}{r.seconds:>10.3f}{r.model_calls:>13}{(r.declared_bytes or 0) / 2**20:>14.2f}")
        print(f"IMP per round (n + 1 trainings): {per_round:.3f} s; one-shot per sparsity (2 masks + loss): "
              f"{per_mask:.3f} s; ratio {per_round / per_mask:.1f}x")
        print(f"final sparsity {imp.value('final_sparsity'):.4f}; Jaccard with one-shot per round "
              f"{[round(j, 3) for j in imp.value('jaccard_one_shot')]}")


if __name__ == "__main__":
    main()
