"""Per-example state at scale, and models spread over devices: measured side by side in one run.

    python bench/bench_scale.py [--quick] [--reps R] [--out PATH]

1. **Projected vs exact per-example inner products.** n per-example gradient-like rows of P entries
   (n = 32, P = 16M and n = 256, P = 4M; quick: P = 1M)
   (float32; a heavy-tailed mix, as real gradients are: a Gaussian times a log-normal scale per entry),
   kept in the core's ``GradientStore``: the exact Gram matrix (``gram``) against the count sketch to
   k = 1024 and 4096 (``CountSketch``, then the k-wide Gram). Reported: time of each (sketching
   included) and the ratio, the largest and RMS error of the inner products in units of ||g|| ||h||,
   against sqrt(2 / k), the bound on its standard deviation.
2. **Exact rows on disk vs in RAM.** The same rows in a disk-backed store: the Gram matrix's time ratio
   and that it is the same bits.
3. **Dispatched vs plain.** ``basic.loss`` + ``basic.activation_stats`` on a GPT-2-shaped model (6
   layers, d 512; quick: 2 layers, d 128) loaded plainly and with half its blocks offloaded to disk by
   accelerate (``device_map``), interleaved over ``--reps``: the time ratio, and the values equal.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from tensorscope_core import RunConfig, analyze  # noqa: E402
from tensorscope_core.example_store import CountSketch, GradientStore, scratch_under  # noqa: E402

HERE = Path(__file__).resolve().parent


def gradient_rows(n: int, size: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(size, generator=gen))  # per-entry scale shared by the examples (log-normal)
    return (torch.randn(n, size, generator=gen) * scale).float()


def timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def projection(n: int, size: int) -> dict[str, Any]:
    rows = gradient_rows(n, size)
    store = GradientStore(size)
    store.add(rows)
    exact_s, exact = timed(store.gram)
    norms = exact.diagonal().sqrt()
    unit = norms[:, None] * norms[None, :]
    off = ~torch.eye(n, dtype=torch.bool)
    out: dict[str, Any] = {"n": n, "P": size, "exact_gram_s": round(exact_s, 3)}
    for k in (1024, 4096):
        sketch = CountSketch(size, k, seed=0)
        s, sketched = timed(lambda sk=sketch: (lambda y: y @ y.T)(sk(rows)))
        err = ((sketched - exact) / unit)[off]
        out[f"k{k}"] = {"seconds": round(s, 3), "speedup_vs_exact": round(exact_s / s, 2),
                        "max_abs_err": round(float(err.abs().max()), 5),
                        "rms_err": round(float(err.pow(2).mean().sqrt()), 5),
                        "sd_bound": round(math.sqrt(2 / k), 5),
                        "state_bytes_ratio": round((n * size * 4) / (n * k * 8), 1)}
    with tempfile.TemporaryDirectory() as tmp, scratch_under(tmp):
        disk = GradientStore(size, backing="disk")
        disk.add(rows)
        disk_s, on_disk = timed(disk.gram)
        out["disk"] = {"gram_s": round(disk_s, 3), "vs_memory": round(disk_s / exact_s, 2),
                       "same_bits": bool(torch.equal(on_disk, exact)), "ram_bytes": disk.nbytes,
                       "file_bytes": disk.stored_bytes}
        disk.close()
    return out


def dispatch(quick: bool, reps: int) -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, d = (2, 128) if quick else (6, 512)
    metrics = ["basic.loss", "basic.activation_stats"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2"
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=d, n_head=8, vocab_size=8192)).save_pretrained(folder)
        device_map = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu",
                      "transformer.ln_f": "cpu", "lm_head": "cpu",
                      **{f"transformer.h.{i}": ("disk" if i >= layers // 2 else "cpu") for i in range(layers)}}
        data = torch.randint(0, 8192, (16, 64), generator=torch.Generator().manual_seed(0))
        base = RunConfig(batch_size=4, memory_budget="8GiB")
        spread = base.model_copy(update={"device_map": device_map, "offload_dir": Path(tmp) / "offload"})
        times: dict[str, list[float]] = {"plain": [], "dispatched": []}
        values = {}
        for _ in range(reps):
            for label, config in (("plain", base), ("dispatched", spread)):
                s, res = timed(lambda c=config: analyze(str(folder), data, metrics, config=c))
                times[label].append(s)
                values[label] = res.get("basic.loss").value("loss")
    plain, spread_s = statistics.median(times["plain"]), statistics.median(times["dispatched"])
    return {"layers": layers, "d_model": d, "offloaded_blocks": layers - layers // 2, "plain_s": round(plain, 2),
            "dispatched_s": round(spread_s, 2), "ratio": round(spread_s / plain, 2),
            "loss_equal": values["plain"] == values["dispatched"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results-scale.json")
    args = parser.parse_args()
    shapes = [(16, 1 << 20), (128, 1 << 20)] if args.quick else [(32, 16_000_000), (256, 4_000_000)]
    report = {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "threads": torch.get_num_threads()},
        "quick": args.quick, "projection": [projection(n, size) for n, size in shapes],
        "dispatch": dispatch(args.quick, args.reps),
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
