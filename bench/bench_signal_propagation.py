"""Bench: chi_l by Hutchinson jvp probes (what dynamics.signal_propagation does) against the
exact tr(J^T J) / dim from a dense Jacobian of each block, side by side in one run on small
models; then the demo's real checkpoints through dynamics.phase_transitions.

    python plugins/tensorscope-dynamics/bench/bench_signal_propagation.py [--no-demo]

Prints, per model and block: exact chi, the estimate, its relative error, and the time of each
method with their ratio (dense / jvp). The demo part trains the core demo's model (checkpoints at
steps 0/25/50/75/100/300, as ``tensorscope demo`` does) and checks that the loss change lies
between steps 50 and 100.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from tensorscope_dynamics.jacobians import block_functions, hutchinson_sums
from torch.func import jacfwd

from tensorscope_core.plugin_api import OneDeviceModel, model_view
from tensorscope_core.testing import random_token_data, single_thread, tiny_model

N_PROBES = 16


def dense_chi(fn, x: torch.Tensor, keep: torch.Tensor) -> float:
    """tr(J_kk^T J_kk) / dim from the full [T d x T d] Jacobian of one sequence (kept positions)."""
    with torch.no_grad():
        jac = jacfwd(fn)(x)  # [1, T, d, 1, T, d]
    k = keep[0].nonzero().flatten()
    sub = jac[0][k][:, :, 0][:, :, k]  # [k, d, k, d]
    return float(sub.double().square().sum()) / (len(k) * x.shape[-1])


def bench_model(family: str, d_model: int, seq: int, root: Path) -> list[str]:
    from transformers import AutoModelForCausalLM

    folder = tiny_model(
        family, root / f"{family}-{d_model}", d_model=d_model, n_layers=2, n_heads=4, with_tokenizer=False
    )
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    ids = random_token_data(64, n=1, length=seq, seed=0)
    mask = torch.ones_like(ids)
    keep = mask.bool().clone()
    keep[:, 0] = False
    lines = []
    with model_view(model) as view:
        fns = block_functions(view, OneDeviceModel(view, []), ids, mask)
        for layer, (fn, x) in enumerate(fns):
            start = time.perf_counter()
            exact = dense_chi(fn, x, keep)
            dense_s = time.perf_counter() - start
            start = time.perf_counter()
            out_sq, in_sq = hutchinson_sums(fn, x, keep, N_PROBES, torch.Generator().manual_seed(layer))
            jvp_s = time.perf_counter() - start
            estimate = out_sq / in_sq
            lines.append(
                f"{family:6s} d={d_model:4d} T={seq:3d} block {layer}: exact chi {exact:.5f}  "
                f"jvp ({N_PROBES} probes) {estimate:.5f}  rel. error {abs(estimate - exact) / exact:.2%}  "
                f"time dense {dense_s * 1e3:8.1f} ms  jvp {jvp_s * 1e3:7.1f} ms  ratio {dense_s / jvp_s:6.1f}x"
            )
    return lines


def demo_check(root: Path) -> str:
    from tensorscope_core import RunConfig, analyze
    from tensorscope_core.demo import CHECKPOINT_STEPS, HALF, repeated_sequences, train

    start = time.perf_counter()
    folders = train(root / "demo", CHECKPOINT_STEPS, seed=0, log=lambda _: None)
    data = repeated_sequences(64, torch.Generator().manual_seed(1))
    res = analyze(
        {name: str(path) for name, path in folders.items()},
        data=data,
        metrics=["dynamics.phase_transitions", "basic.loss"],
        params={"dynamics.phase_transitions": {"series": ["basic.loss.loss"]}},
        config=RunConfig(seed=0, batch_size=16, max_length=2 * HALF),
    )
    losses = [round(res.get("basic.loss", model=n).value("loss"), 3) for n in folders]
    table = res.get("dynamics.phase_transitions").value("changes")
    rows = [dict(zip(table.columns, r, strict=True)) for r in table.rows]
    inside = bool(rows) and all(50 <= r["step_before"] and r["step_after"] <= 100 for r in rows)
    spans = [(r["step_before"], r["step_after"]) for r in rows]
    return (
        f"demo checkpoints {list(CHECKPOINT_STEPS)}: loss {losses}; changes at steps {spans}; "
        f"between 50 and 100: {inside}  ({time.perf_counter() - start:.0f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-demo", action="store_true", help="skip the demo's checkpoints")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, single_thread():
        root = Path(tmp)
        for family, d_model, seq in (("gpt2", 32, 16), ("llama", 64, 16), ("gpt2", 128, 24)):
            for line in bench_model(family, d_model, seq, root):
                print(line, flush=True)
        if not args.no_demo:
            print(demo_check(root), flush=True)


if __name__ == "__main__":
    main()
