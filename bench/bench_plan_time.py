"""How long `tensorscope plan` takes for every metric on Llama-2-7B (one 80 GiB GPU) and on Llama-2-70B spread
over a 40 GiB GPU share and the CPU, planned from their configs (the plans of `plan_large_models.py`), this
checkout against another one, side by side.

    python bench/bench_plan_time.py [--against OTHER_CHECKOUT] [--pairs 2]

Each side runs in a fresh process (imports not timed: the `plan` call only), the two sides alternating,
``--pairs`` times; the other checkout's core and plugins go first on its ``PYTHONPATH``. Each side reports the
plans' peaks and how many metrics they leave out, which must be equal: the plan is the same, only its making
is faster or slower. Without ``--against``, this checkout alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("Llama-2-7B", "Llama-2-70B, 40 GiB on the GPU, the rest in CPU memory")


def child(checkout: Path) -> None:
    """Time each plan in this process and print one JSON line."""
    sys.path.insert(0, str(checkout / "bench"))
    from plan_large_models import MODELS, PLANS
    from transformers import LlamaConfig

    from tensorscope_core import plan

    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fields in MODELS.items():
            LlamaConfig(**fields).save_pretrained(Path(tmp) / name)
        for column in COLUMNS:
            name, config = PLANS[column]
            start = time.perf_counter()
            made = plan(str(Path(tmp) / name), None, "all", config=config)[0]
            out[column] = {"seconds": time.perf_counter() - start, "peak": made.peak_bytes,
                           "left_out": len(made.left_out)}
    print(json.dumps(out))


def side(checkout: Path) -> dict[str, dict[str, float]]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if checkout != ROOT:
        paths = [checkout / "src", *sorted((checkout / "plugins").glob("*/src"))]
        env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, __file__, "--child", str(checkout)], env=env, capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", type=Path, help="another checkout of the project (e.g. a git worktree)")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    for pair in range(args.pairs):
        ours = side(ROOT)
        theirs = side(args.against.resolve()) if args.against else None
        for column in COLUMNS:
            line = f"pair {pair + 1}  {column[:40]:40s} this {ours[column]['seconds']:7.1f} s"
            if theirs is not None:
                same = (ours[column]["peak"], ours[column]["left_out"]) == (theirs[column]["peak"],
                                                                           theirs[column]["left_out"])
                line += (f"   other {theirs[column]['seconds']:7.1f} s   ratio "
                         f"{ours[column]['seconds'] / theirs[column]['seconds']:.3f}   same plan: {same}")
            print(line, flush=True)


if __name__ == "__main__":
    main()
