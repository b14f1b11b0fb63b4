"""Cost of gradients.tracin's checkpoint interpolation: interpolation_points 0 (TracInCP) against 3,
side by side in one process on the same checkpoints and examples.

    python plugins/tensorscope-gradients/bench/bench_tracin_path.py [--reps R]

Three checkpoints of a small GPT-2 (4 blocks, d_model 128) saved with ``save_pretrained``;
32 training and 8 test examples of 32 tokens; wall time of ``analyze`` end to end (loading,
the checkpoints' tracin_terms, the model-set stage). With n points per interval, the model-set
stage adds (checkpoints - 1) x n per-example backward passes over the training and test
examples, so the expected ratio is about 1 + (C - 1) n / C = 3 for C = 3, n = 3 (the extra
points skip the loading and the shared forward, so somewhat less).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf

from tensorscope_core import RunConfig, analyze

TRACIN = "gradients.tracin"


def checkpoints(root: Path) -> dict[str, Path]:
    config = tf.GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=2048, n_positions=64)
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(config)
    out = {}
    for step in (100, 200, 300):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(root / f"checkpoint-{step}")
        out[f"checkpoint-{step}"] = root / f"checkpoint-{step}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    data = {"train": torch.randint(4, 2048, (32, 32), generator=gen),
            "test": torch.randint(4, 2048, (8, 32), generator=gen)}
    with tempfile.TemporaryDirectory() as tmp:
        folders = checkpoints(Path(tmp))
        times: dict[int, list[float]] = {0: [], 3: []}
        for _ in range(args.reps):
            for n in times:  # interleaved, so drift on a shared machine hits both alike
                start = time.perf_counter()
                config = RunConfig(batch_size=8, force_recompute=True)
                res = analyze(folders, data=data, metrics=[TRACIN], config=config,
                              params={TRACIN: {"learning_rates": [1e-3, 5e-4, 2.5e-4], "interpolation_points": n}})
                times[n].append(time.perf_counter() - start)
                assert res.get(TRACIN).ok, res.get(TRACIN).reason
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"gradients.tracin, 3 GPT-2 checkpoints (4 x 128), 32 train x 8 test, {args.reps} reps, 1 thread")
    print(f"  interpolation_points=0: median {med[0]:.2f} s  {[round(t, 2) for t in times[0]]}")
    print(f"  interpolation_points=3: median {med[3]:.2f} s  {[round(t, 2) for t in times[3]]}")
    print(f"  ratio n=3 / n=0: {med[3] / med[0]:.2f}x")


if __name__ == "__main__":
    main()
