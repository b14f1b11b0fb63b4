"""What information.mutual_information (probe MI and Gaussian/CCA MI per layer) adds to the shared forward.

    python plugins/tensorscope-information/bench/bench_information.py [--sequences N] [--length L] [--reps R]

A GPT-2-small-shaped model (12 layers, d_model 768, 12 heads, vocab 50257), random init,
float32 on the CPU, on random token sequences. Side by side in one process, interleaved:

- ``forward``: ``basic.loss`` alone, i.e. the shared forward pass (token loss) and nothing else;
- ``mi``: ``basic.loss`` + ``information.mutual_information`` with estimators probe and
  gaussian (13 probes, 12 Gaussian MIs, each with its bootstrap), sharing that forward.

Reported: wall seconds of each run (median over reps), the metric's own seconds, the ratio
mi / forward, and the forward passes each run made (must be equal: the metric adds no pass).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from tensorscope_core import RunConfig, analyze  # noqa: E402

METRIC = "information.mutual_information"


def build_model(folder: Path) -> Path:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return folder


def run(folder: Path, data: torch.Tensor, metrics: list[str], params: dict, batch_size: int) -> tuple[float, dict]:
    start = time.perf_counter()
    res = analyze(
        folder,
        data=data,
        metrics=metrics,
        params=params,
        config=RunConfig(batch_size=batch_size, max_length=data.shape[1]),
    )
    wall = time.perf_counter() - start
    record = res.record.models[0]
    seconds = {name: record.metrics[name].seconds for name in metrics}
    statuses = {name: record.metrics[name].status for name in metrics}
    return wall, {
        "passes": dict(record.passes),
        "seconds": seconds,
        "status": statuses,
        "values": res.get(METRIC).values if METRIC in metrics else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--n-bootstrap", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    data = torch.randint(4, 50257, (args.sequences, args.length), generator=torch.Generator().manual_seed(0))
    params = {
        METRIC: {
            "estimators": ["probe", "gaussian"],
            "tokens_per_sequence": args.length,
            "max_tokens": args.sequences * args.length,
            "n_bootstrap": args.n_bootstrap,
        }
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(Path(tmp) / "gpt2-small-shaped")
        walls: dict[str, list[float]] = {"forward": [], "mi": []}
        info: dict[str, dict] = {}
        for rep in range(args.reps):
            for label, metrics in (("forward", ["basic.loss"]), ("mi", ["basic.loss", METRIC])):
                wall, detail = run(folder, data, metrics, params if label == "mi" else {}, args.batch_size)
                walls[label].append(wall)
                info[label] = detail
                print(
                    f"rep {rep} {label:8s} {wall:8.2f} s  passes {detail['passes']}  metric s {detail['seconds']}",
                    flush=True,
                )
    forward, mi = statistics.median(walls["forward"]), statistics.median(walls["mi"])
    values = info["mi"]["values"]
    summary = {
        "model": "GPT-2-small shape (12 layers, d 768, vocab 50257), random init, float32 CPU",
        "threads": torch.get_num_threads(),
        "sequences": args.sequences,
        "length": args.length,
        "tokens_sampled": values["tokens"].value,
        "n_bootstrap": args.n_bootstrap,
        "forward_wall_s": walls["forward"],
        "mi_wall_s": walls["mi"],
        "ratio_mi_over_forward": mi / forward,
        "metric_seconds": info["mi"]["seconds"][METRIC],
        "passes_forward": info["forward"]["passes"],
        "passes_mi": info["mi"]["passes"],
        "probe_next_token": values["probe_next_token"].values,
        "gaussian": values["gaussian"].values,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
