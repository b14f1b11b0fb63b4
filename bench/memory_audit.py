"""Every metric's declared memory against what the process held, on a random LLaMA with a real 135M
model's shape (30 layers, d 576, 9 / 3 heads, MLP 1536, vocabulary 49,152, tied embeddings): the
table in docs/memory-audit.md.

    python bench/memory_audit.py [--layers 30] [--metrics PREFIX,...] [--rows bench/results-memory-audit.jsonl]
                                 [--out docs/memory-audit.md] [--dispatched]

Each metric runs alone at the demo's settings (``testing.SMALL_DATA_PARAMS`` for the few that need more
data) on two tasks of 2 x 32 tokens (``memory_audit.audit``;
model-set metrics over a base and three other models of the shape, ``memory_audit.audit_set``), after a
warm-up on a tiny model. Rows append to ``--rows`` as they finish, tagged with the commit, so a run can
be split (``--metrics``) and resumed; the table is written from the rows of the newest commit of each
metric. ``--dispatched`` audits per-model metrics on the same model spread by accelerate, every odd-numbered
layer offloaded to disk (saved and loaded with ``device_map``; the warm-up model likewise): what the
metrics that load the weights themselves (``offloaded_bytes``) declare, against what they held; its rows
are tagged and its table is ``docs/memory-audit-dispatched.md``. The whole audit takes about an hour and up
to 12 GiB on 2 cores. ``tests/test_memory_audit.py``'s
``realshape`` tests make the same runs and fail on a metric that is off.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tensorscope_core import RunConfig  # noqa: E402
from tensorscope_core.config import format_bytes  # noqa: E402
from tensorscope_core.demo import demo_params  # noqa: E402
from tensorscope_core.memory_audit import MemoryAudit, audit, audit_set  # noqa: E402
from tensorscope_core.plugins import get_registry  # noqa: E402
from tensorscope_core.process_memory import return_freed_memory  # noqa: E402
from tensorscope_core.testing import REAL_135M, SMALL_DATA_PARAMS, real_shaped_llama  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIG = RunConfig(batch_size=2, max_length=32, memory_budget="20GiB")


def tasks(vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {task: torch.randint(0, vocab, (2, 32), generator=gen) for task in ("train", "test")}


def tiny(seed: int = 0) -> torch.nn.Module:
    return real_shaped_llama(seed=seed, num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                             num_key_value_heads=2, intermediate_size=128, vocab_size=512)


def settings(names: list[str]) -> dict[str, dict]:
    return {**demo_params(names), **{m: p for m, p in SMALL_DATA_PARAMS.items() if m in names}}


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=False).stdout.strip() or "unknown"


def dispatched(model: Any, folder: Path) -> torch.nn.Module:
    """``model`` saved and loaded back by accelerate with every odd-numbered layer offloaded to disk."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(folder / "weights")
    layers = model.config.num_hidden_layers
    placement = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
                 **{f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(layers)}}
    return AutoModelForCausalLM.from_pretrained(folder / "weights", device_map=placement,
                                                offload_folder=str(folder / "offload"), dtype=torch.float32).eval()


def run(names: list[str], layers: int, record: callable, spread: bool = False) -> None:  # type: ignore[valid-type]
    registry = get_registry().metrics
    per_model = [n for n in names if registry[n].scope == "model" and (not spread or registry[n].supports_dispatch)]
    per_set = [n for n in names if registry[n].scope == "model_set" and not spread]
    data, warm = tasks(REAL_135M["vocab_size"]), tasks(512)
    if per_model:
        with tempfile.TemporaryDirectory() as tmp:
            model, warm_up = real_shaped_llama(num_hidden_layers=layers), tiny()
            if spread:
                model, warm_up = dispatched(model, Path(tmp) / "model"), dispatched(warm_up, Path(tmp) / "tiny")
            audit(model, data, per_model, params=settings(per_model), config=CONFIG, warm_up=warm_up,
                  warm_up_data=warm, progress=record)
    if per_set:
        members = {name: real_shaped_llama(seed=seed, num_hidden_layers=layers) for seed, name in enumerate("abc", 1)}
        audit_set(members, data, per_set, base=real_shaped_llama(num_hidden_layers=layers),
                  params=settings(per_set), config=CONFIG, warm_up={m: tiny(seed) for seed, m in enumerate("abc", 1)},
                  warm_up_base=tiny(), warm_up_data=warm, progress=record)


def render(rows: dict[str, dict], layers: int, spread: bool = False) -> str:
    def pair(row: dict, what: str) -> str:
        return f"{format_bytes(row['declared_' + what])} / {format_bytes(row['held_' + what])}"

    lines = ["# Declared memory against what the run held" + (", on a dispatched model" if spread else ""), "",
             f"Generated by `python bench/memory_audit.py{' --dispatched' if spread else ''}` on a random LLaMA "
             f"with a real 135M model's shape ({layers} layers, d 576, 9 / 3 heads, MLP 1536, vocabulary 49,152, "
             "tied embeddings"
             + ("; loaded by accelerate with every odd-numbered layer offloaded to disk), each per-model metric"
                if spread else "), each metric"),
             "alone at the demo's settings on two tasks of 2 x 32 tokens, on 2 CPU cores. *Peak*: the plan's peak",
             "above the weights (model-set metrics: the set stage's) against the process's resident peak above what",
             "it held before (Linux `VmHWM`); *state*: declared against what the metric held at its end; *results*:",
             "the tensors among its results, which the run keeps. A row is ok when every pair is within 15% (or 48",
             "MiB). Skipped metrics ran nothing to compare.", "",
             "| metric | peak declared / held | state | results | verdict | commit |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name in sorted(rows):
        row = rows[name]
        audit_row = MemoryAudit(**{k: row[k] for k in MemoryAudit.__dataclass_fields__})
        verdict = "ok" if audit_row.ok else ("skipped" if not audit_row.ran else f"**off** ({row['status']})")
        lines.append(f"| `{name}` | {pair(row, 'peak')} | {pair(row, 'state')} | {pair(row, 'results')} | "
                     f"{verdict} | {row['commit']} |")
    ok = sum(MemoryAudit(**{k: r[k] for k in MemoryAudit.__dataclass_fields__}).ok for r in rows.values())
    ran = sum(r["status"] != "skipped" for r in rows.values())
    lines += ["", f"{ok} of the {ran} metrics that ran agree; {len(rows) - ran} skipped."]
    missing = sorted(n for n, cls in get_registry().metrics.items()
                     if n not in rows and (not spread or (cls.scope == "model" and cls.supports_dispatch)))
    if missing:
        lines += ["", "Not in this table yet (no row at this shape): " + ", ".join(f"`{m}`" for m in missing) + "."]
    if any(r["commit"].endswith("*") for r in rows.values()):
        lines += ["", "A commit ending in * marks a row measured on a working tree ahead of that commit, for a metric "
                      "whose declaration did not change after."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=REAL_135M["num_hidden_layers"])
    parser.add_argument("--metrics", default="", help="comma-separated name prefixes (default: every metric)")
    parser.add_argument("--rows", type=Path, default=ROOT / "bench" / "results-memory-audit.jsonl")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: docs/memory-audit.md (--dispatched: docs/memory-audit-dispatched.md)")
    parser.add_argument("--render-only", action="store_true", help="write the table from the rows, run nothing")
    parser.add_argument("--dispatched", action="store_true",
                        help="audit the per-model metrics on the model with every odd-numbered layer on disk")
    args = parser.parse_args()
    # the audit's malloc setting before any model is built: set only once the 135M model had been built and
    # freed, the heaps it left made dynamics.signal_propagation on the dispatched model seem to hold 275-288
    # MiB, against 250 MiB (declared 217) with it set first
    return_freed_memory()
    out = args.out if args.out is not None else ROOT / "docs" / (
        "memory-audit-dispatched.md" if args.dispatched else "memory-audit.md")
    names = sorted(n for n in get_registry().metrics
                   if not args.metrics or any(n.startswith(p) for p in args.metrics.split(",")))
    tag, started = commit(), time.perf_counter()

    def record(row: MemoryAudit) -> None:
        print(f"{time.perf_counter() - started:7.1f}s {row.line()}", flush=True)
        with args.rows.open("a") as f:
            f.write(json.dumps({**row.__dict__, "layers": args.layers, "commit": tag,
                                "dispatched": args.dispatched}) + "\n")

    if not args.render_only:
        run(names, args.layers, record, args.dispatched)
    rows: dict[str, dict] = {}
    for line in args.rows.read_text().splitlines() if args.rows.exists() else []:
        row = json.loads(line)
        if row["layers"] == args.layers and row.pop("dispatched", False) == args.dispatched:
            rows[row["metric"]] = row  # the newest row of each metric wins
    out.write_text(render(rows, args.layers, args.dispatched))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
