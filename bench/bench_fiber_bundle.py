"""geometry.fiber_bundle's neighbour radii against the reference code's approach, on a GPT-2-sized
embedding matrix (50,257 x 768, random, fixed seed).

    python bench/bench_fiber_bundle.py [--quick] [--reps R] [--threads N] [--no-full] [--out PATH]

The reference (kb1dds/stratified_estimator, split_geo_estimator.py) rounds the coordinates to
float16, builds ``scipy.spatial.distance_matrix(coords, coords)`` (V x V float64: 20.2 GB here, more
than this machine has) and sorts every column in full, though the test reads only entries
vol_min..vol_max. Ours (``tensorscope_geometry.neighbours.knn_radii``, what the metric calls):
chunks of query rows, one float32 matrix product and ``torch.topk`` per chunk, the kept
candidates' distances recomputed in float64 from differences (exact, certified per row).

Both sides start from the same float16-rounded coordinates. The reference cannot run in full, so
both are timed on slices of query rows, interleaved over repetitions (A, B, B, A, ...), and
extrapolated to all V rows: both costs are linear in the number of query rows (each row is one
pass over all V points). The ratio is the median over repetitions with the min-max. Ours is also
run once on the full matrix (in a child process that measures its peak resident memory), unless
--no-full. The reference's memory is computed: the distance matrix, plus the sorted copy np.sort
returns. The radii of the reference slice are compared with ours (goal: within 1e-3 relative).
The second table times the change-point scan: our vectorised ``stratify`` on every token against
the reference's per-token loop (scipy.stats.ttest_ind per window) on a slice, extrapolated.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import scipy.spatial
import scipy.stats
import torch
from bench_measure import Clock, spread, table, timed
from tensorscope_geometry.neighbours import knn_radii
from tensorscope_geometry.strata import stratify

HERE = Path(__file__).resolve().parent
SPEED_GOAL = 100.0  # reference time / ours
MEMORY_GOAL = 100.0  # reference bytes / ours
AGREEMENT = 1e-3  # max relative difference of the radii
VOL_MIN, VOL_MAX = 10, 100  # the metric's defaults (the reference CLI's vol_max = 50 is refused)
CHUNK = 512  # the metric's default chunk_size


@dataclass(frozen=True)
class Size:
    quick: bool
    vocab: int
    d: int
    ref_rows: int  # query rows the reference is timed on
    our_rows: int  # query rows ours is timed on
    scan_rows: int  # tokens the reference's per-token scan loop is timed on
    reps: int


FULL = Size(quick=False, vocab=50257, d=768, ref_rows=8, our_rows=2048, scan_rows=100, reps=3)
QUICK = Size(quick=True, vocab=8192, d=256, ref_rows=8, our_rows=1024, scan_rows=20, reps=3)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def coordinates(size: Size, seed: int = 0) -> torch.Tensor:
    """The float16-rounded embedding both sides use (GPT-2's init scale, 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    return (0.02 * torch.randn(size.vocab, size.d, generator=gen)).half()


def reference_radii(coords16: np.ndarray, rows: int) -> np.ndarray:
    """The reference's steps for the first ``rows`` columns of its distance matrix: scipy's
    distance_matrix against every point, then a full sort (the matrix is symmetric, so its column i
    is row i); entries 0..vol_max - 1 kept."""
    dists = scipy.spatial.distance_matrix(coords16[:rows], coords16)
    return np.sort(dists, axis=1)[:, :VOL_MAX]


def reference_scan(radii: np.ndarray, npts: int) -> None:
    """The reference's per-token loop over windows, on precomputed radii (its cost after the sort)."""
    volumes = np.arange(VOL_MIN, VOL_MAX)
    for row in radii:
        r = row[VOL_MIN:VOL_MAX]
        lo = int(np.argmax(r > 1e-10))
        for _ in range(3):
            dimvec = np.gradient(np.log(volumes[lo:])) / np.gradient(np.log(r[lo:]))
            hit = None
            for w in range(20, dimvec.shape[0] - 20):
                if scipy.stats.ttest_ind(dimvec[w - 20:w - 10], dimvec[w + 10:w + 20], equal_var=False).pvalue \
                        < 1e-3 / 3:
                    hit = w
                    break
            stop = r.shape[0] if hit is None else lo + hit
            np.linalg.lstsq(np.column_stack((np.ones(stop - lo), np.log(r[lo:stop]))), np.log(volumes[lo:stop]),
                            rcond=None)
            if hit is None:
                break
            lo = stop


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _full_run(size: Size, threads: int, queue: Any) -> None:
    """Child process: ours on every row; peak resident memory above what the input already took."""
    torch.set_num_threads(threads)
    points = coordinates(size).float()
    knn_radii(points[:VOL_MAX * 2], VOL_MAX, CHUNK)  # load the kernels first: their code is not working memory
    try:  # reset the high-water mark so that making the input does not count
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    before = _rss("VmRSS")
    clock = Clock()
    with timed(clock):
        radii = knn_radii(points, VOL_MAX, CHUNK)
    queue.put({"cpu": clock.cpu, "wall": clock.wall, "peak_bytes": _rss("VmHWM") - before,
               "hwm_reset": reset, "rows": int(radii.shape[0])})


def full_run(size: Size, threads: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_full_run, args=(size, threads, queue))
    child.start()
    out = queue.get()
    child.join()
    return dict(out)


def relative_difference(ours: np.ndarray, ref: np.ndarray) -> float:
    nonzero = ref > 0
    return float(np.max(np.abs(ours[nonzero] - ref[nonzero]) / ref[nonzero]))


def bench(size: Size, threads: int, reps: int, full: bool) -> dict[str, Any]:
    torch.set_num_threads(threads)
    coords16 = coordinates(size)
    coords16_np, points = coords16.numpy(), coords16.float()
    v = size.vocab
    ref_clocks, our_clocks = [], []
    ref_radii = ours_slice = None
    for rep in range(reps):
        for side in (("ref", "ours") if rep % 2 == 0 else ("ours", "ref")):
            clock = Clock()
            if side == "ref":
                with timed(clock):
                    ref_radii = reference_radii(coords16_np, size.ref_rows)
                ref_clocks.append(clock)
            else:
                with timed(clock):
                    ours_slice = knn_radii(points, VOL_MAX, CHUNK, rows=range(size.our_rows))
                our_clocks.append(clock)
            log(f"rep {rep} {side}: {clock.cpu:.2f} s cpu, {clock.wall:.2f} s wall")
    assert ref_radii is not None and ours_slice is not None
    agreement = relative_difference(ours_slice[: size.ref_rows].numpy(), ref_radii)

    def per_row(clocks: list[Clock], rows: int, clock: str) -> list[float]:
        return [getattr(c, clock) / rows for c in clocks]

    ratios = {clock: spread([r / o for r, o in zip(per_row(ref_clocks, size.ref_rows, clock),
                                                   per_row(our_clocks, size.our_rows, clock), strict=True)])
              for clock in ("cpu", "wall")}
    extrapolated = {side: {clock: statistics.median(per_row(c, rows, clock)) * v for clock in ("cpu", "wall")}
                    for side, c, rows in (("reference", ref_clocks, size.ref_rows),
                                          ("ours", our_clocks, size.our_rows))}
    ours_full = full_run(size, threads) if full else None
    ours_declared = 4 * min(CHUNK, v) * v + 8 * v * VOL_MAX  # FiberBundle.cost: the block and the radii
    memory = {"reference_distance_matrix_bytes": 8 * v * v, "reference_peak_bytes": 2 * 8 * v * v,
              "ours_declared_bytes": ours_declared,
              "ours_measured_peak_bytes": None if ours_full is None else ours_full["peak_bytes"]}
    ours_bytes = memory["ours_measured_peak_bytes"] or ours_declared

    # the change-point scan: ours on every token, the reference's loop on a slice
    radii_all = knn_radii(points, VOL_MAX, CHUNK, rows=range(min(v, 4096))).numpy()
    scan_ours, scan_ref = Clock(), Clock()
    with timed(scan_ours):
        stratify(radii_all, VOL_MIN, VOL_MAX, npts=v)
    with timed(scan_ref):
        reference_scan(radii_all[: size.scan_rows], v)
    scan_ratio = (scan_ref.cpu / size.scan_rows) / (scan_ours.cpu / radii_all.shape[0])
    return {
        "size": asdict(size), "threads": threads, "reps": reps, "ratio": ratios,
        "extrapolated_seconds": extrapolated, "ours_full": ours_full, "memory": memory,
        "memory_ratio": memory["reference_distance_matrix_bytes"] / ours_bytes,
        "memory_ratio_peak": memory["reference_peak_bytes"] / ours_bytes, "radii_max_relative_difference": agreement,
        "scan": {"ours_cpu_per_token": scan_ours.cpu / radii_all.shape[0],
                 "reference_cpu_per_token": scan_ref.cpu / size.scan_rows, "ratio": scan_ratio},
        "goals": {"speed": SPEED_GOAL, "memory": MEMORY_GOAL, "agreement": AGREEMENT},
        "verdicts": {"speed": ratios["cpu"]["median"] >= SPEED_GOAL,
                     "memory": memory["reference_distance_matrix_bytes"] / ours_bytes >= MEMORY_GOAL,
                     "agreement": agreement <= AGREEMENT},
    }


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2 ** 30:.2f} GiB"


def report(out: dict[str, Any]) -> str:
    s, r, e, m = out["size"], out["ratio"], out["extrapolated_seconds"], out["memory"]
    full = out["ours_full"]
    rows = [
        ["time, all rows (cpu s)", f"{e['reference']['cpu']:.0f} (from {s['ref_rows']} rows)",
         f"{e['ours']['cpu']:.1f} (from {s['our_rows']} rows)" + (f"; full run {full['cpu']:.1f}" if full else ""),
         f"{r['cpu']['median']:.0f}x [{r['cpu']['min']:.0f}-{r['cpu']['max']:.0f}]",
         f">= {SPEED_GOAL:.0f}x: {'pass' if out['verdicts']['speed'] else 'FAIL'}"],
        ["time, all rows (wall s)", f"{e['reference']['wall']:.0f}", f"{e['ours']['wall']:.1f}",
         f"{r['wall']['median']:.0f}x [{r['wall']['min']:.0f}-{r['wall']['max']:.0f}]", ""],
        ["memory", f"{gib(m['reference_distance_matrix_bytes'])} matrix, {gib(m['reference_peak_bytes'])} with "
                   "the sorted copy (computed)",
         f"{gib(m['ours_measured_peak_bytes'])} peak measured, {gib(m['ours_declared_bytes'])} declared",
         f"{out['memory_ratio']:.0f}x ({out['memory_ratio_peak']:.0f}x vs peak)",
         f">= {MEMORY_GOAL:.0f}x: {'pass' if out['verdicts']['memory'] else 'FAIL'}"],
        ["radii on the slice", "", "", f"max rel. diff {out['radii_max_relative_difference']:.1e}",
         f"<= {AGREEMENT:g}: {'pass' if out['verdicts']['agreement'] else 'FAIL'}"],
        ["change-point scan (cpu s/token)", f"{out['scan']['reference_cpu_per_token'] * 1e3:.2f} ms",
         f"{out['scan']['ours_cpu_per_token'] * 1e3:.3f} ms", f"{out['scan']['ratio']:.0f}x", ""],
    ]
    head = (f"geometry.fiber_bundle neighbour radii: {s['vocab']} x {s['d']} float16-rounded coordinates, "
            f"k = {VOL_MAX}, chunk {CHUNK}, {out['threads']} thread(s), {out['reps']} interleaved reps")
    return head + "\n" + table(["", "reference approach", "ours", "ratio", "goal"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8192 x 256 instead of 50257 x 768 (seconds)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-full", action="store_true", help="skip ours on the full matrix (and its memory)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    out = bench(size, args.threads, args.reps or size.reps, not args.no_full)
    out.update({"python": platform.python_version(), "torch": torch.__version__, "scipy": scipy.__version__,
                "numpy": np.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    print(report(out))
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
