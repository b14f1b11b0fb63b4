"""Freed tensors go back to the system: with glibc's mmap threshold fixed (``return_freed_memory``, as the
memory audit sets it, or the ``GLIBC_TUNABLES`` setting the user guide gives for a run), blocks of a few
MiB freed between live small ones leave no resident memory behind; with glibc's default, which raises
the threshold after a larger block is freed, they stay resident."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tensorscope_core.process_memory import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="glibc only: other C libraries have no mmap threshold")

#: frees 100 blocks of 2 MiB allocated between small tensors that stay; prints the resident MiB left
CHURN = """
import sys, torch
from pathlib import Path
from tensorscope_core.process_memory import return_freed_memory

def resident() -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024

if sys.argv[1] == "fixed":
    return_freed_memory()
torch.ones(2 * 2**20)  # an 8 MiB block, mapped and freed: glibc's default threshold rises past it
start = resident()
blocks, kept = [], []
for _ in range(100):
    blocks.append(torch.ones(2**19))  # 2 MiB
    kept.append(torch.ones(64))
del blocks
print((resident() - start) / 2**20)
"""


def _left_resident(mode: str, tunables: str | None = None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip())


def test_freed_blocks_leave_nothing_resident_with_the_threshold_fixed() -> None:
    fixed, default = _left_resident("fixed"), _left_resident("default")
    tuned = _left_resident("default", "glibc.malloc.mmap_threshold=131072")  # the user guide's setting
    assert fixed < 2.0 and tuned < 2.0, f"{fixed:.1f} / {tuned:.1f} MiB of freed blocks still resident"
    assert default > fixed + 4.0, f"glibc's default kept {default:.1f} MiB, the fixed threshold {fixed:.1f}"
